"""Sweep files: their schema, reading them, and their trials (expanded once, on load).

A sweep file names engine `Config` fields by dotted path (``lam``, ``eval.epochs``) in its
`engine` section (settings every trial shares) and its `grid` (the axes swept). Everything is
checked here, before anything launches, and every problem found is reported at once in one
`SpecError`, each line naming the field that caused it::

    grid.lamda: unknown engine field 'lamda'; did you mean 'lam'? (allowed: dataset, ...)
    grid.ipc[1]: Input should be greater than 0 (got 0)

How the trials are made from the file is in `orchestrator.expand`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from mim4dd.settings import describe_error, get_dotted, loc_text
from orchestrator.expand import BASE_KEY, Trial, expand, path_problem, render

DEFAULT_EXPERIMENT = "mim4dd"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_NAME = 100  # it names folders and files (plus suffixes): well inside NAME_MAX (255)
DEFAULT_MAX_TRIALS = 10_000  # a typo'd axis can multiply a grid into millions of trials
MAX_YAML_NODES = 100_000  # a sweep file's size with its aliases expanded (alias bombs)
ENGINE_KEY = "engine"
OLD_ENGINE_KEY = "base"  # the engine section's name before 0.2; still read, with a notice


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
    """One sweep file. Build it with `load_spec` or `parse_spec`, which also make its trials."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, max_length=MAX_NAME,
                      description="identifies the sweep; the resume key")
    experiment: str | None = Field(None, description=f"MLflow experiment ({DEFAULT_EXPERIMENT!r})")
    description: str = ""
    engine: dict[str, Any] = Field(default_factory=dict, description="engine settings for all")
    grid: dict[str, list[Any]] = Field(description="dotted engine path -> values to sweep")
    variants: list[dict[str, Any]] = Field(
        default_factory=list, description="settings rows, each run at every grid point (one "
        "factor at a time); an empty row {} is the grid point as it is")
    include: list[dict[str, Any]] = Field(default_factory=list, description="extra trials")
    exclude: list[dict[str, Any]] = Field(default_factory=list, description="grid points to drop")
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(None, ge=1)
    retries: int = Field(1, ge=0, description="Tune max_failures per trial")
    checkpoint_every: int = Field(50, ge=1, description="iterations between Tune checkpoints")
    # Each report is a round trip to Tune's controller; checkpoints, evaluation networks and
    # the result always report (benchmarks/bench_service_overhead.py measured the cadence).
    report_every_s: float = Field(1.0, ge=0, description="seconds between progress reports "
                                  "to Tune (0: every iteration)")
    # A sweep setting, not an engine one: it adds numbers to a trial without changing its set,
    # so it leaves every trial's config digest (and a finished trial) as it is.
    random_baseline: bool = Field(
        False, description="also evaluate a random real subset of each trial's size (cached "
        "per data x IPC x seed x protocol); report shows 'Δ vs random'")
    ray_address: str | None = None
    tracking_uri: str | None = None
    max_trials: int = Field(DEFAULT_MAX_TRIALS, ge=1, description="refuse a larger grid")
    pending_timeout_s: float | None = Field(
        900, gt=0, description="end the sweep when trials wait this long for resources while "
        "none runs; null waits forever (an autoscaling cluster)",
    )

    _trials: list[Trial] | None = PrivateAttr(None)
    _notices: list[str] = PrivateAttr(default_factory=list)

    @property
    def experiment_name(self) -> str:
        return self.experiment or DEFAULT_EXPERIMENT

    @property
    def notices(self) -> list[str]:
        """What the user should change in the file although it is valid (deprecations)."""
        return list(self._notices)

    def trials(self) -> list[Trial]:
        """Every trial of the sweep, validated, in a deterministic order (expanded once).
        Raises SpecError."""
        if self._trials is None:
            trials, problems = _trials_of(self, ENGINE_KEY)
            if problems:
                raise SpecError(problems)
            self._trials = trials
        return self._trials


def load_spec(
    path: str | Path, *, address: str | None = None, tracking_uri: str | None = None,
    max_trials: int | None = None,
) -> SweepSpec:
    """Read and fully validate a sweep file; `address`/`tracking_uri`/`max_trials` (from the
    CLI) win over the file's fields. Raises SpecError listing every problem."""
    data = _read_yaml(Path(path))
    for field, value in (("ray_address", address), ("tracking_uri", tracking_uri),
                         ("max_trials", max_trials)):
        if value is not None:
            data[field] = value
    return parse_spec(data)


def parse_spec(data: Mapping[str, Any]) -> SweepSpec:
    """Validate an already-parsed sweep (schema and every trial) and expand its trials.
    Raises SpecError."""
    data, label, notices = _renamed_engine(dict(data))
    problems: list[str] = []
    try:
        spec: SweepSpec | None = SweepSpec.model_validate(data)
    except ValidationError as exc:
        problems += [_schema_problem(err, label) for err in exc.errors()]
        spec = _salvage(data, exc)  # so engine problems are reported in the same pass
    trials: list[Trial] = []
    if spec is not None:
        trials, found = _trials_of(spec, label)
        problems += found
    if problems:
        raise SpecError(problems)
    assert spec is not None
    spec._trials, spec._notices = trials, notices
    return spec


def _renamed_engine(data: dict[str, Any]) -> tuple[dict[str, Any], str, list[str]]:
    """The file with an old `base:` section read as `engine:`; the label its messages use."""
    if OLD_ENGINE_KEY not in data:
        return data, ENGINE_KEY, []
    if ENGINE_KEY in data:
        raise SpecError([f"{OLD_ENGINE_KEY}: the engine section is given twice, as "
                         f"{OLD_ENGINE_KEY}: and {ENGINE_KEY}:; keep only {ENGINE_KEY}:"])
    data[ENGINE_KEY] = data.pop(OLD_ENGINE_KEY)
    notice = (f"{OLD_ENGINE_KEY}: the engine section is now called {ENGINE_KEY}: (so a sweep "
              f"reads engine: {{base: dm}}); rename it - {OLD_ENGINE_KEY}: is still read")
    return data, OLD_ENGINE_KEY, [notice]


def _trials_of(spec: SweepSpec, label: str) -> tuple[list[Trial], list[str]]:
    count = (math.prod(len(v) for v in spec.grid.values()) * max(len(spec.variants), 1)
             + len(spec.include))
    if count > spec.max_trials:  # counted before anything is expanded
        return [], [f"grid: {count} trials is above max_trials ({spec.max_trials}); check the "
                    "axes, or raise the cap (max_trials: in the file, --max-trials on the CLI)"]
    trials, problems = expand(spec.engine, spec.grid, spec.include, spec.exclude, label,
                              spec.variants)
    if not trials and not problems:
        problems.append("grid: the sweep has no trials (every grid point is excluded); "
                        "remove exclude rows or add include rows")
    if ordinals := sorted({t.config.device for t in trials if ":" in t.config.device}):
        problems.append(
            f"device: {', '.join(ordinals)} names a device by number, but Ray assigns each trial "
            "its GPUs and shows them to it from cuda:0 on (allowed: auto, cpu, cuda)")
    if spec.resources.gpu == 0:
        devices = sorted({t.config.device for t in trials if t.config.device.startswith("cuda")})
        if devices:
            problems.append(
                f"resources.gpu: trials ask for device {', '.join(devices)} but resources.gpu "
                "is 0, and Ray hides every GPU from such trials (allowed: a gpu > 0, or "
                "device 'auto'/'cpu')"
            )
    return trials, problems


def trial_table(spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial for a dry-run printout: key, the value of every swept setting, cpu, gpu."""
    trials = spec.trials()
    columns = list(spec.grid)
    for trial in trials:
        columns += [path for path in trial.overrides if path not in columns]
    rows = []
    for trial in trials:
        values = trial.values()
        row: dict[str, Any] = {"key": trial.key}
        row.update({path: get_dotted(values, path) for path in columns})
        row.update(cpu=spec.resources.cpu, gpu=spec.resources.gpu)
        rows.append(row)
    return rows


# --- reading the file ------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (YAML keeps the last) and a
    document too large once its aliases are expanded (an alias bomb)."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None and (size := _expanded_size(node, {})) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"the file expands to {size} values through its aliases "
                                 f"(*name), above {MAX_YAML_NODES}: refused")
        return node


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Values in `node` with every alias expanded, counted in linear time (shared nodes once)."""
    if id(node) not in memo:
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        memo[id(node)] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[id(node)]


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
    except RecursionError:
        raise SpecError([f"{path}: the YAML is nested too deeply"]) from None
    if data is None:
        raise SpecError([f"{path}: the sweep file is empty"])
    if not isinstance(data, dict):
        raise SpecError(
            [f"{path}: a sweep file is a mapping of fields (name, grid, ...), "
             f"not a {type(data).__name__}"]
        )
    return data


# --- schema errors ---------------------------------------------------------------------------


def _schema_problem(err: Any, engine_label: str = ENGINE_KEY) -> str:
    loc = err["loc"]
    if loc[:1] == (ENGINE_KEY,):  # named as the file names it
        loc = (engine_label, *loc[1:])
    where = loc_text(loc)
    if err["type"] == "extra_forbidden":
        model = Resources if loc[:1] == ("resources",) else SweepSpec
        name = str(loc[-1])
        hint = ""
        if model is SweepSpec and path_problem(name) is None:
            hint = f"; engine settings go under {ENGINE_KEY}: (or grid: to sweep them)"
        allowed = ", ".join(model.model_fields)
        return f"{where}: unknown sweep field {name!r}{hint} (allowed: {allowed})"
    if loc[:1] == ("grid",) and len(loc) == 2 and err["type"] == "list_type":
        if isinstance(err["input"], dict):
            return f"{where}: grid axes are dotted paths with a list, e.g. 'eval.epochs: [50]'"
        return f"{where}: an axis is a list of values, e.g. [{render(err['input'])}]"
    return f"{where}: {describe_error(err)}"


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
            mapping = field in (ENGINE_KEY, "grid") and isinstance(value, dict)
            if not mapping or None in bad[field]:
                continue
            value = {k: v for k, v in value.items() if k not in bad[field]}
        clean[field] = value
    clean["name"] = "salvaged"
    clean.setdefault("grid", {})
    try:
        return SweepSpec.model_validate(clean)
    except ValidationError:
        return None


__all__ = [
    "BASE_KEY",
    "DEFAULT_EXPERIMENT",
    "Resources",
    "SpecError",
    "SweepSpec",
    "Trial",
    "load_spec",
    "parse_spec",
    "trial_table",
]
