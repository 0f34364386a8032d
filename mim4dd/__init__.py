"""mim4dd: MIM4DD dataset distillation (the engine; the sweep service is `orchestrator`)."""

from importlib import metadata

try:
    __version__ = metadata.version("mim4dd")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
