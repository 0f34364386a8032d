"""The sweep service: a YAML sweep file becomes Ray Tune trials of the `mim4dd` engine, each
logged to MLflow. The engine never imports this package; this package imports the engine."""
