"""The registry of base objectives: `Config.base` names one of these.

A base is one class (a `MatchingObjective` subclass) in one file. Adding a base to mim4dd is
that file plus one line in `BUILTIN`; a base kept outside the package registers itself with
`register_base` from a module named in ``$MIM4DD_PLUGINS`` (comma-separated module names or
``.py`` paths), which every process - a sweep's Ray workers included - imports before it
reads a config.

Entries are ``"module:Class"`` text, imported on first use, so this module imports nothing of
mim4dd and `config.py` can validate against it without an import circle.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mim4dd.objectives.base import MatchingObjective

PLUGINS_ENV = "MIM4DD_PLUGINS"

BUILTIN: dict[str, str] = {
    "dm": "mim4dd.objectives.distribution:DistributionMatching",
    "dc": "mim4dd.objectives.gradient:GradientMatching",
    "mtt": "mim4dd.objectives.trajectory:TrajectoryMatching",
    "cafe": "mim4dd.objectives.cafe:CAFE",
}

_registry: dict[str, str | type] = dict(BUILTIN)
_loaded_plugins: set[str] = set()


def register_base(name: str, objective: str | type[MatchingObjective]) -> None:
    """Make `name` a valid `Config.base`; `objective` is the class or ``"module:Class"``."""
    if not name.isidentifier():
        raise ValueError(f"a base name is an identifier, got {name!r}")
    _registry[name] = objective


def plugin_modules() -> list[str]:
    """The plugin entries of ``$MIM4DD_PLUGINS``, in order."""
    return [p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(",") if p.strip()]


def load_plugins(entries: list[str] | None = None) -> None:
    """Import each plugin once (module name, or path of a .py file); they register bases."""
    for entry in plugin_modules() if entries is None else entries:
        if entry in _loaded_plugins:
            continue
        if entry.endswith(".py"):
            path = Path(entry).expanduser().resolve()
            spec = importlib.util.spec_from_file_location(f"mim4dd_plugin_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"{PLUGINS_ENV}: cannot load {entry}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            importlib.import_module(entry)
        _loaded_plugins.add(entry)


def base_names() -> list[str]:
    """Every registered base, built-ins first, in registration order."""
    load_plugins()
    return list(_registry)


def unknown_base_message(name: str) -> str:
    names = [repr(n) for n in base_names()]
    allowed = " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]
    return f"{name!r} is not allowed (allowed: {allowed})"


def base_class(name: str) -> type[MatchingObjective]:
    """The objective class of a base; ValueError naming the allowed bases otherwise."""
    load_plugins()
    if name not in _registry:
        raise ValueError(f"base: {unknown_base_message(name)}")
    target = _registry[name]
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
        _registry[name] = target
    return target


__all__ = ["BUILTIN", "PLUGINS_ENV", "base_class", "base_names", "load_plugins",
           "plugin_modules", "register_base", "unknown_base_message"]
