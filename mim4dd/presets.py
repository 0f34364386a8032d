"""Named hyper-parameter presets per base and dataset x IPC, read from `presets.yaml`.

The values are data, not code: one YAML file in the package holds every cell, and
`Config(preset=...)` merges a preset under the fields a config sets itself.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import yaml


@cache
def _table() -> dict[str, dict[str, dict[str, Any]]]:
    text = resources.files("mim4dd").joinpath("presets.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def preset_names(base: str) -> list[str]:
    """The presets defined for a base (empty for a base without any)."""
    return sorted(_table().get(base, {}))


def preset_values(base: str, name: str) -> dict[str, Any]:
    """The field values of one preset; a clear ValueError names the allowed ones otherwise."""
    presets = _table().get(base, {})
    if name not in presets:
        allowed = ", ".join(preset_names(base)) or "none"
        raise ValueError(f"unknown preset {name!r} for base {base!r}; allowed: {allowed}")
    # A copy, so a caller that edits the result cannot change the cached table.
    return {key: (list(v) if isinstance(v, list) else v) for key, v in presets[name].items()}


__all__ = ["preset_names", "preset_values"]
