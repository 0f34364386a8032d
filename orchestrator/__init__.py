"""The sweep service: a YAML sweep file becomes Ray Tune trials of the `mim4dd` engine, each
logged to MLflow. The engine never imports this package; this package imports the engine."""

import os

# Every process of the service (driver, trials, expert tasks) imports this package before
# MLflow. No phoning home; and MLflow's telemetry thread edits os.environ while `requests`
# reads it: a KeyError that failed a trial's log_batch under load (BENCHMARKS.md section 5).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
