"""Sweep files: their schema, their validation and their expansion into trials.

A sweep file names engine `Config` fields by dotted path (``lam``, ``eval.epochs``). Everything
is checked here, before anything launches, and every problem found is reported at once in one
`SpecError`, each line naming the field that caused it::

    grid.lamda: unknown engine field 'lamda'; did you mean 'lam'? (allowed: dataset, ...)
    grid.ipc[1]: Input should be greater than 0 (got 0)

Expansion: the cartesian product of the `grid` axes (first axis varies slowest), minus the
grid points an `exclude` row matches, then one trial per `include` row. Each trial's engine
config is `base` with the trial's values on top; nested mappings merge field by field, so
``base: {eval: {epochs: 20}}`` and ``base: {eval.epochs: 20}`` mean the same thing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mim4dd.config import Config

DEFAULT_EXPERIMENT = "mim4dd"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
BASE_KEY = "(base)"  # key of a trial that overrides nothing

# A leaf is one engine setting taken from the sweep file: dotted path -> (value, where it was
# written, e.g. "grid.ipc[1]"), so engine errors can be traced back to a line of the file.
Leaves = dict[str, tuple[Any, str]]


class SpecError(ValueError):
    """An invalid sweep file. `problems` holds one line per problem, "field.path: message"."""

    def __init__(self, problems: list[str]):
        self.problems = list(dict.fromkeys(problems))  # the same problem once, in order found
        super().__init__("\n".join(self.problems))


class Resources(BaseModel):
    """What Ray reserves for each trial."""

    model_config = ConfigDict(extra="forbid")

    cpu: float = Field(1.0, gt=0, description="CPU cores per trial")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial; 0.25 packs four trials on a GPU")


class SweepSpec(BaseModel):
    """One sweep file. Build it with `load_spec` or `parse_spec`, which also check the trials."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="identifies the sweep; the resume key")
    experiment: str | None = Field(None, description=f"MLflow experiment ({DEFAULT_EXPERIMENT!r})")
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict, description="engine settings for all")
    grid: dict[str, list[Any]] = Field(description="dotted engine path -> values to sweep")
    include: list[dict[str, Any]] = Field(default_factory=list, description="extra trials")
    exclude: list[dict[str, Any]] = Field(default_factory=list, description="grid points to drop")
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(None, ge=1)
    retries: int = Field(1, ge=0, description="Tune max_failures per trial")
    checkpoint_every: int = Field(50, ge=1, description="iterations between Tune checkpoints")
    ray_address: str | None = None
    tracking_uri: str | None = None

    @property
    def experiment_name(self) -> str:
        return self.experiment or DEFAULT_EXPERIMENT

    def trials(self) -> list[Trial]:
        """Every trial of the sweep, validated, in a deterministic order. Raises SpecError."""
        trials, problems = _expand(self)
        if problems:
            raise SpecError(problems)
        return trials


@dataclass(frozen=True)
class Trial:
    """One point of a sweep."""

    key: str  # canonical id, e.g. "ipc=10,lam=0.8,seed=0"; finds finished trials on resume
    overrides: dict[str, Any]  # dotted path -> value, as the engine normalised it
    config: Config  # base + overrides, validated

    @property
    def config_digest(self) -> str:
        """Short hash of the full engine config: tells a changed `base` from a finished run."""
        return hashlib.sha256(_config_text(self.config).encode()).hexdigest()[:16]


def load_spec(
    path: str | Path, *, address: str | None = None, tracking_uri: str | None = None
) -> SweepSpec:
    """Read and fully validate a sweep file; `address`/`tracking_uri` (from the CLI) win over
    the file's `ray_address`/`tracking_uri`. Raises SpecError listing every problem."""
    data = _read_yaml(Path(path))
    if address is not None:
        data["ray_address"] = address
    if tracking_uri is not None:
        data["tracking_uri"] = tracking_uri
    return parse_spec(data)


def parse_spec(data: Mapping[str, Any]) -> SweepSpec:
    """Validate an already-parsed sweep (schema and every trial). Raises SpecError."""
    problems: list[str] = []
    try:
        spec: SweepSpec | None = SweepSpec.model_validate(dict(data))
    except ValidationError as exc:
        problems += [_schema_problem(err) for err in exc.errors()]
        spec = _salvage(dict(data), exc)  # so engine problems are reported in the same pass
    if spec is not None:
        problems += _expand(spec)[1]
    if problems:
        raise SpecError(problems)
    assert spec is not None
    return spec


def trial_table(spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial for a dry-run printout: key, the value of every swept setting, cpu, gpu."""
    trials = spec.trials()
    columns = list(spec.grid)
    for trial in trials:
        columns += [path for path in trial.overrides if path not in columns]
    rows = []
    for trial in trials:
        values = trial.config.model_dump(mode="json")
        row: dict[str, Any] = {"key": trial.key}
        row.update({path: _get_dotted(values, path) for path in columns})
        row.update(cpu=spec.resources.cpu, gpu=spec.resources.gpu)
        rows.append(row)
    return rows


def set_dotted(tree: dict[str, Any], path: str, value: Any) -> None:
    """tree["a"]["b"]["c"] = value for path "a.b.c", creating the mappings on the way."""
    *parents, last = path.split(".")
    node = tree
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ValueError(f"cannot set {path!r}: {name!r} holds a value, not a mapping")
        node = child
    node[last] = value


# --- reading the file ------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (YAML keeps the last)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice in one mapping", key_node.start_mark
            )
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"{path}: sweep file not found"]) from None
    except IsADirectoryError:
        raise SpecError([f"{path}: is a directory, not a sweep file"]) from None
    except UnicodeDecodeError:
        raise SpecError([f"{path}: is not UTF-8 text"]) from None
    except OSError as exc:
        raise SpecError([f"{path}: cannot be read ({exc.strerror})"]) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown line"
        what = "; ".join(part for part in (exc.context, exc.problem) if part)
        raise SpecError([f"{path}: YAML error at {where}: {what}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"{path}: YAML error: {exc}"]) from None
    if data is None:
        raise SpecError([f"{path}: the sweep file is empty"])
    if not isinstance(data, dict):
        raise SpecError(
            [f"{path}: a sweep file is a mapping of fields (name, grid, ...), "
             f"not a {type(data).__name__}"]
        )
    return data


# --- schema errors ---------------------------------------------------------------------------


def _schema_problem(err: Any) -> str:
    loc = err["loc"]
    where = _loc_text(loc)
    if err["type"] == "extra_forbidden":
        model = Resources if loc[:1] == ("resources",) else SweepSpec
        name = str(loc[-1])
        hint = ""
        if model is SweepSpec and _path_problem(name) is None:
            hint = "; engine settings go under base: (or grid: to sweep them)"
        allowed = ", ".join(model.model_fields)
        return f"{where}: unknown sweep field {name!r}{hint} (allowed: {allowed})"
    if loc[:1] == ("grid",) and len(loc) == 2 and err["type"] == "list_type":
        if isinstance(err["input"], dict):
            return f"{where}: grid axes are dotted paths with a list, e.g. 'eval.epochs: [50]'"
        return f"{where}: an axis is a list of values, e.g. [{_render(err['input'])}]"
    return f"{where}: {_describe(err)}"


def _salvage(data: dict[str, Any], exc: ValidationError) -> SweepSpec | None:
    """The spec without its schema errors, to check the rest against the engine."""
    bad: dict[Any, set[Any]] = {}
    for err in exc.errors():
        loc = err["loc"]
        bad.setdefault(loc[0] if loc else None, set()).add(loc[1] if len(loc) > 1 else None)
    clean = {}
    for field, value in data.items():
        if field not in SweepSpec.model_fields:
            continue
        if field in bad:
            if field not in ("base", "grid") or not isinstance(value, dict) or None in bad[field]:
                continue
            value = {k: v for k, v in value.items() if k not in bad[field]}
        clean[field] = value
    clean["name"] = "salvaged"
    clean.setdefault("grid", {})
    try:
        return SweepSpec.model_validate(clean)
    except ValidationError:
        return None


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


def _path_problem(path: str) -> str | None:
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
        why = _path_problem(path)
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
        return None, [(_locate(err["loc"], leaves), _describe(err)) for err in exc.errors()]


def _locate(loc: tuple[Any, ...], leaves: Leaves) -> str | None:
    """Label of the leaf an engine error points into, plus the rest of the error's location."""
    names = list(itertools.takewhile(lambda part: isinstance(part, str), loc))
    for n in range(len(names), 0, -1):
        path = ".".join(names[:n])
        if path in leaves:
            return leaves[path][1] + _loc_text(loc[n:], top=False)
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
        return _render(raw)
    return _render(_get_dotted(config.model_dump(mode="json"), path))


# --- expansion -------------------------------------------------------------------------------


def _expand(spec: SweepSpec) -> tuple[list[Trial], list[str]]:
    problems: list[str] = []
    base = _collect(_flatten(spec.base, "", "base"), problems)
    problems += [f"{where}: {msg}" for where, msg in _build(base)[1] if where]
    axes = _axes(spec, problems)
    excludes = _exclude_rows(spec, problems)
    trials: list[tuple[str, Trial]] = []  # (origin, trial)
    for point in itertools.product(*(list(enumerate(v)) for v in axes.values())):
        if any(choice is None for _, choice in point):
            continue  # a bad value, already reported
        chosen = {axis: choice for axis, (_, choice) in zip(axes, point)}
        texts = {axis: text for axis, (_, text) in chosen.items()}
        if any(all(texts.get(p) == t for p, t in row.items()) for row in excludes):
            continue
        key = ",".join(f"{axis}={texts[axis]}" for axis in sorted(axes)) or BASE_KEY
        leaves = base
        for axis_leaves, _ in chosen.values():
            leaves = _merge(leaves, axis_leaves)
        config, errors = _build(leaves)
        for where, msg in errors:  # no `where`: a cross-field check of the whole trial
            problems.append(f"{where}: {msg}" if where else f"grid: trial {key}: {msg}")
        if config is not None:
            values = config.model_dump(mode="json")
            overrides = {axis: _get_dotted(values, axis) for axis in sorted(axes)}
            trials.append(("grid", Trial(key, overrides, config)))

    for j, row in enumerate(spec.include):
        count = len(problems)
        extra = _collect(_flatten(row, "", f"include[{j}]"), problems)
        config, errors = _build(_merge(base, extra))
        problems += [f"{where or f'include[{j}]'}: {msg}" for where, msg in errors]
        if config is not None and len(problems) == count:
            values = config.model_dump(mode="json")
            overrides = {path: _get_dotted(values, path) for path in sorted(extra)}
            key = ",".join(f"{p}={_render(v)}" for p, v in overrides.items()) or BASE_KEY
            trials.append((f"include[{j}]", Trial(key, overrides, config)))

    problems += _duplicates(trials)
    if spec.resources.gpu == 0:
        devices = sorted({t.config.device for _, t in trials if t.config.device.startswith("cuda")})
        if devices:
            problems.append(
                f"resources.gpu: trials ask for device {', '.join(devices)} but resources.gpu "
                "is 0, and Ray hides every GPU from such trials (allowed: a gpu > 0, or "
                "device 'auto'/'cpu')"
            )
    return [trial for _, trial in trials], problems


def _axes(spec: SweepSpec, problems: list[str]) -> dict[str, list[tuple[Leaves, str] | None]]:
    """Every usable axis with each value checked on its own: (leaves, canonical text), or
    None for a value that is invalid."""
    axes: dict[str, list[tuple[Leaves, str] | None]] = {}
    for axis, values in spec.grid.items():
        if (why := _path_problem(axis)) is not None:
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


def _exclude_rows(spec: SweepSpec, problems: list[str]) -> list[dict[str, str]]:
    """Each usable exclude row as {axis: canonical text}."""
    rows = []
    for j, row in enumerate(spec.exclude):
        if not row:
            problems.append(f"exclude[{j}]: an empty row would drop every grid point")
            continue
        count = len(problems)
        canonical = {}
        for path, leaf in _collect(_flatten(row, "", f"exclude[{j}]"), problems).items():
            if path not in spec.grid:
                axes = ", ".join(spec.grid) or "none"
                problems.append(f"{leaf[1]}: {path!r} is not a grid axis (allowed: {axes})")
            else:
                canonical[path] = _check_alone({path: leaf}, path, leaf[0], problems)
        if len(problems) == count:
            rows.append(canonical)
    return rows


def _duplicates(trials: list[tuple[str, Trial]]) -> list[str]:
    problems = []
    seen: dict[str, str] = {}
    for origin, trial in trials:
        text = _config_text(trial.config)
        if text in seen:
            same = "" if seen[text] == trial.key else f" (same engine config as {seen[text]})"
            problems.append(f"{origin}: duplicate trial {trial.key}{same}")
        else:
            seen[text] = trial.key
    return problems


# --- small helpers ---------------------------------------------------------------------------


def _config_text(config: Config) -> str:
    """Canonical JSON of a whole config: equal text, equal trial."""
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


def _get_dotted(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for name in path.split("."):
        node = node[name]
    return node


def _render(value: Any) -> str:
    """Canonical text of a value: 0.8 and 0.80 read the same, 1.0 reads 1."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _loc_text(loc: tuple[Any, ...], top: bool = True) -> str:
    """("grid", "ipc", 1) -> "grid.ipc[1]"."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    return text.removeprefix(".") if top else text


def _describe(err: Any) -> str:
    """A pydantic error as one readable phrase, with the offending value."""
    if err["type"] == "literal_error":
        return f"{_short(err['input'])} is not allowed (allowed: {err['ctx']['expected']})"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] != "missing" and "input" in err:
        got = _short(err["input"])
        if not (err["type"] == "value_error" and got in message):  # our validators quote it
            message += f" (got {got})"
    return message


__all__ = [
    "DEFAULT_EXPERIMENT",
    "Resources",
    "SpecError",
    "SweepSpec",
    "Trial",
    "load_spec",
    "parse_spec",
    "set_dotted",
    "trial_table",
]
