"""Expansion of a sweep's engine settings into validated trials, every problem collected.

A leaf is one engine setting taken from the sweep file: dotted path -> (value, where it was
written, e.g. "grid.ipc[1]"), so an engine error can be traced back to a line of the file.

The trials: the cartesian product of the `grid` axes (first axis varies slowest), minus the
grid points an `exclude` row matches, each point once per `variants` row (a row's settings on
top of the point's: one-factor-at-a-time ablations), then one trial per `include` row. Each
trial's engine config is the `engine` section with the trial's values on top; nested mappings
merge field by field, so ``{eval: {epochs: 20}}`` and ``{eval.epochs: 20}`` mean the same.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any

from pydantic import BaseModel, ValidationError

from mim4dd.config import Config
from mim4dd.settings import describe_error, get_dotted, loc_text, set_dotted

BASE_KEY = "(base)"  # key of a trial that overrides nothing

Leaves = dict[str, tuple[Any, str]]


@dataclass(frozen=True)
class Trial:
    """One point of a sweep, identified by its key and by the digest of its whole config."""

    key: str  # canonical id, e.g. "ipc=10,lam=0.8,seed=0"; finds finished trials on resume
    overrides: dict[str, Any]  # dotted path -> value, as the engine normalised it
    config: Config  # the engine section + overrides, validated
    digest: str = field(init=False)  # tells a changed config from a finished run of the key

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", self.config.digest())

    def values(self) -> dict[str, Any]:
        """The full engine config as JSON (what crosses to a trial process)."""
        return self.config.model_dump(mode="json")


# --- engine paths ----------------------------------------------------------------------------


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _group(path: str) -> type[BaseModel] | None:
    """The config section a path names ("" is the whole Config), or None for a setting."""
    model: type[BaseModel] | None = Config
    for name in path.split(".") if path else []:
        field = model.model_fields.get(name) if model else None
        model = _submodel(field.annotation) if field else None
    return model


def path_problem(path: str) -> str | None:
    """Why `path` names no engine Config field, or None when it does."""
    model: type[BaseModel] | None = Config
    parts = path.split(".")
    for n, name in enumerate(parts):
        if model is None:
            parent = ".".join(parts[:n])
            return f"{parent!r} is a single setting, it has no field {name!r}"
        fields = list(model.model_fields)
        if name not in fields:
            close = get_close_matches(name, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"unknown engine field {name!r}{hint} (allowed: {', '.join(fields)})"
        model = _submodel(model.model_fields[name].annotation)
    return None


def _flatten(value: Any, path: str, label: str) -> list[tuple[str, Any, str]]:
    """(path, value, label) leaves: a mapping given for a config section is split into its
    fields, so nested and dotted spellings give the same leaves."""
    if isinstance(value, dict) and _group(path) is not None:
        leaves = []
        for key, item in value.items():
            leaves += _flatten(item, f"{path}.{key}" if path else str(key), f"{label}.{key}")
        return leaves
    return [(path, value, label)]


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _collect(items: list[tuple[str, Any, str]], problems: list[str]) -> Leaves:
    """Leaves with known, non-clashing paths; the others become problems."""
    leaves: Leaves = {}
    for path, value, label in items:
        why = path_problem(path)
        clash = next((p for p in leaves if _overlaps(p, path)), None)
        if why:
            problems.append(f"{label}: {why}")
        elif clash:
            problems.append(f"{label}: the same setting is given twice (also as {clash!r})")
        else:
            leaves[path] = (value, label)
    return leaves


def _merge(leaves: Leaves, extra: Leaves) -> Leaves:
    merged = dict(leaves)
    for path, leaf in extra.items():
        for old in [p for p in merged if _overlaps(p, path)]:
            del merged[old]  # the trial's own value replaces base's
        merged[path] = leaf
    return merged


# --- engine validation -----------------------------------------------------------------------


def _build(leaves: Leaves) -> tuple[Config | None, list[tuple[str | None, str]]]:
    """The Config of these leaves, or its errors as (label of the leaf at fault, message)."""
    tree: dict[str, Any] = {}
    for path, (value, _) in leaves.items():
        set_dotted(tree, path, value)
    try:
        return Config.model_validate(tree), []
    except ValidationError as exc:
        return None, [(_locate(err["loc"], leaves), describe_error(err)) for err in exc.errors()]


def _locate(loc: tuple[Any, ...], leaves: Leaves) -> str | None:
    """Label of the leaf an engine error points into, plus the rest of the error's location."""
    names = list(itertools.takewhile(lambda part: isinstance(part, str), loc))
    for n in range(len(names), 0, -1):
        path = ".".join(names[:n])
        if path in leaves:
            return leaves[path][1] + loc_text(loc[n:], top=False)
    return None  # a cross-field check, or a field this sweep does not set


def _check_alone(leaves: Leaves, path: str, raw: Any, problems: list[str]) -> str | None:
    """Check one value on its own (type and range; cross-field checks wait for the full
    trial). Returns its canonical text, or None when it is invalid."""
    config, errors = _build(leaves)
    faults = [f"{where}: {msg}" for where, msg in errors if where]
    problems += faults
    if faults:
        return None
    if config is None:  # only a cross-field check failed, against engine defaults
        return render(raw)
    return render(get_dotted(config.model_dump(mode="json"), path))


# --- expansion -------------------------------------------------------------------------------


def expand(
    engine: Mapping[str, Any], grid: Mapping[str, list[Any]], include: list[dict[str, Any]],
    exclude: list[dict[str, Any]], engine_label: str = "engine",
    variants: list[dict[str, Any]] | None = None,
) -> tuple[list[Trial], list[str]]:
    """Every trial, in a deterministic order, and every problem found ("where: message");
    `engine_label` is the name the file gave its engine section, for the messages."""
    problems: list[str] = []
    base = _collect(_flatten(dict(engine), "", engine_label), problems)
    problems += [f"{where}: {msg}" for where, msg in _build(base)[1] if where]
    axes = _axes(grid, problems)
    excludes = _exclude_rows(exclude, grid, problems)
    rows = _variant_rows(variants or [{}], grid, problems)
    trials: list[tuple[str, Trial]] = []  # (origin, trial)
    for point in itertools.product(*(list(enumerate(v)) for v in axes.values())):
        if any(choice is None for _, choice in point):
            continue  # a bad value, already reported
        chosen = {axis: choice for axis, (_, choice) in zip(axes, point)}
        texts = {axis: text for axis, (_, text) in chosen.items()}
        if any(all(texts.get(p) == t for p, t in row.items()) for row in excludes):
            continue
        point_leaves = base
        for axis_leaves, _ in chosen.values():
            point_leaves = _merge(point_leaves, axis_leaves)
        for origin, extra in rows:
            config, errors = _build(_merge(point_leaves, extra))
            values = config.model_dump(mode="json") if config is not None else {}
            parts = texts | {p: render(get_dotted(values, p)) for p in extra if values}
            key = ",".join(f"{p}={parts[p]}" for p in sorted(parts)) or BASE_KEY
            for where, msg in errors:  # no `where`: a cross-field check of the whole trial
                problems.append(f"{where}: {msg}" if where else f"{origin}: trial {key}: {msg}")
            if config is not None:
                overrides = {path: get_dotted(values, path) for path in sorted(parts)}
                trials.append((origin, Trial(key, overrides, config)))

    for j, row in enumerate(include):
        count = len(problems)
        extra = _collect(_flatten(row, "", f"include[{j}]"), problems)
        config, errors = _build(_merge(base, extra))
        problems += [f"{where or f'include[{j}]'}: {msg}" for where, msg in errors]
        if config is not None and len(problems) == count:
            values = config.model_dump(mode="json")
            overrides = {path: get_dotted(values, path) for path in sorted(extra)}
            key = ",".join(f"{p}={render(v)}" for p, v in overrides.items()) or BASE_KEY
            trials.append((f"include[{j}]", Trial(key, overrides, config)))

    problems += _duplicates(trials)
    return [trial for _, trial in trials], problems


def _axes(
    grid: Mapping[str, list[Any]], problems: list[str]
) -> dict[str, list[tuple[Leaves, str] | None]]:
    """Every usable axis with each value checked on its own: (leaves, canonical text), or
    None for a value that is invalid."""
    axes: dict[str, list[tuple[Leaves, str] | None]] = {}
    for axis, values in grid.items():
        if (why := path_problem(axis)) is not None:
            problems.append(f"grid.{axis}: {why}")
        elif not values:
            problems.append(f"grid.{axis}: axis has no values")
        elif (other := next((a for a in axes if _overlaps(a, axis)), None)) is not None:
            problems.append(f"grid.{axis}: overlaps the axis {other!r}")
        else:
            axes[axis] = []
            for i, value in enumerate(values):
                count = len(problems)
                leaves = _collect(_flatten(value, axis, f"grid.{axis}[{i}]"), problems)
                text = _check_alone(leaves, axis, value, problems)
                ok = text is not None and len(problems) == count
                axes[axis].append((leaves, text) if ok else None)
    return axes


def _variant_rows(
    variants: list[dict[str, Any]], grid: Mapping[str, list[Any]], problems: list[str]
) -> list[tuple[str, Leaves]]:
    """Each usable variants row as (origin, leaves); a row may not set a grid axis."""
    rows = []
    for j, row in enumerate(variants):
        origin = f"variants[{j}]" if row else "grid"
        count = len(problems)
        leaves = _collect(_flatten(row, "", origin), problems)
        for path, (_, label) in leaves.items():
            if axis := next((a for a in grid if _overlaps(a, path)), None):
                problems.append(f"{label}: {path!r} is also the grid axis {axis!r}; a variant "
                                "may set only what the grid does not sweep")
        if len(problems) == count:
            rows.append((origin, leaves))
    return rows


def _exclude_rows(
    exclude: list[dict[str, Any]], grid: Mapping[str, list[Any]], problems: list[str]
) -> list[dict[str, str]]:
    """Each usable exclude row as {axis: canonical text}."""
    rows = []
    for j, row in enumerate(exclude):
        if not row:
            problems.append(f"exclude[{j}]: an empty row would drop every grid point")
            continue
        count = len(problems)
        canonical = {}
        for path, leaf in _collect(_flatten(row, "", f"exclude[{j}]"), problems).items():
            if path not in grid:
                axes = ", ".join(grid) or "none"
                problems.append(f"{leaf[1]}: {path!r} is not a grid axis (allowed: {axes})")
            else:
                canonical[path] = _check_alone({path: leaf}, path, leaf[0], problems)
        if len(problems) == count:
            rows.append(canonical)
    return rows


def _duplicates(trials: list[tuple[str, Trial]]) -> list[str]:
    problems = []
    seen: dict[str, str] = {}  # digest -> key
    for origin, trial in trials:
        if trial.digest in seen:
            first = seen[trial.digest]
            same = "" if first == trial.key else f" (same engine config as {first})"
            problems.append(f"{origin}: duplicate trial {trial.key}{same}")
        else:
            seen[trial.digest] = trial.key
    return problems


def render(value: Any) -> str:
    """Canonical text of a value: 0.8 and 0.80 read the same, 1.0 reads 1."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


__all__ = ["BASE_KEY", "Trial", "expand", "path_problem", "render"]
