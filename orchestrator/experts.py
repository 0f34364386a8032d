"""The expert stage: the buffers a sweep's trajectory-matching trials read, trained once per key.

Trajectory matching (``base: mtt``) reads expert trajectories from the folder the engine derives
from a trial's config (`mim4dd.experts.expert_dir`): ``<data cache>/experts/<dataset>-<digest>``
by default, or the config's ``expert_dir``, which on a cluster must be a path every node sees.
Every trial of every sweep with the same key (dataset, split, model, augmentation, expert
epochs and optimiser) reads the same folder. Before any trial starts, `prepare`:

1. checks, in a Ray task (which runs where the data and the shared path are), each distinct
   buffer the trials need: its key digest, its folder, the experts it must hold (the largest
   ``num_experts`` of its trials) and its state - complete, partial or missing. A folder sealed
   for other settings, one folder named for two keys, or data that cannot be loaded fail the
   stage;
2. reuses complete buffers as they are;
3. trains every missing expert of the other buffers as one Ray task each (the engine's
   `train_expert`, with a trial's CPU and GPU share); expert files already there for the key are
   kept, so an interrupted stage resumes where it stopped;
4. seals each of those buffers (`write_manifest`) and checks it with `ExpertBuffer.open`;
5. hands each sealed manifest to `on_sealed`; the service logs it as a small MLflow run in the
   sweep's experiment, tagged ``mim4dd.experts=<digest>``. Only the manifest: the trajectories
   stay on the shared path, as a buffer is gigabytes (100 experts x 51 copies of every
   weight), too big to store per trial.

Any problem raises `ExpertStageError` before a trial starts, so a missing or partial buffer is
never handed to a trial (and the engine still checks sizes on open and sha256 on first read).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from mim4dd.bases import base_class
from mim4dd.config import Config
from mim4dd.data import RealData, load_for, load_once
from mim4dd.experts import (
    MANIFEST_FILE, ExpertBuffer, ExpertBufferError, expert_dir, expert_key, key_digest,
    missing_experts, train_expert, write_manifest,
)
from orchestrator.spec import SweepSpec, Trial

COMPLETE, PARTIAL, MISSING = "complete", "partial", "missing"
REFUSED = "refused"  # the folder holds another key's buffer, or two keys name one folder
UNKNOWN = "unknown"  # the key cannot be computed: the dataset could not be loaded


class ExpertStageError(RuntimeError):
    """A buffer the trials need cannot be provided; no trial was started."""


@dataclass
class Buffer:
    """One expert buffer and the trials that read it."""

    digest: str  # of the key; "" when unknown
    directory: str
    count: int  # experts it must hold
    config: dict[str, Any]  # engine config (JSON) of its first trial: what experts train with
    state: str = MISSING
    detail: str = ""
    trials: list[str] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)  # experts to train
    trained: list[int] = field(default_factory=list)  # experts this stage trained

    def row(self) -> dict[str, Any]:
        detail = self.detail.splitlines()[0] if self.detail else ""  # a table cell
        return {"buffer": self.digest or "?", "experts": self.count, "state": self.state,
                "detail": detail, "trials": len(self.trials), "folder": self.directory}


def needs_experts(trial: Trial) -> bool:
    return base_class(trial.config.base).needs_experts


# --- what the trials need ------------------------------------------------------------------


def check_buffers(trials: list[tuple[str, dict[str, Any]]], download: bool = True) -> list[Buffer]:
    """Group trials, given as (key, engine config JSON), by the buffer they read; check each."""
    loaded: dict[tuple, RealData | Exception] = {}
    buffers: dict[str, Buffer] = {}
    for key, values in trials:
        config = Config.model_validate(values)
        data = load_once(config, loaded, download)
        if isinstance(data, Exception):
            buffer = buffers.setdefault(f"?{config.dataset}", Buffer(
                "", "", config.num_experts, values, UNKNOWN,
                f"cannot load {config.dataset} to compute the key: {data}"))
        else:
            folder = str(expert_dir(config, data))
            digest = key_digest(expert_key(config, data))
            buffer = buffers.setdefault(folder, Buffer(digest, folder, 0, values))
            if buffer.digest != digest:
                buffer.state = REFUSED
                buffer.detail = (f"trials {buffer.trials[0]} and {key} set the same expert_dir "
                                 "for different expert settings; give each its own expert_dir")
            buffer.count = max(buffer.count, config.num_experts)
        buffer.trials.append(key)
    for buffer in buffers.values():
        if buffer.state == MISSING:
            config = Config.model_validate(buffer.config)
            _check(buffer, config, load_once(config, loaded, download))
    return list(buffers.values())


def _check(buffer: Buffer, config: Config, data: RealData) -> None:
    folder = Path(buffer.directory)
    key = expert_key(config, data)
    sealed = _manifest(folder)
    if sealed is not None and sealed.get("key") != key:
        buffer.state = REFUSED
        buffer.detail = (f"{folder} holds a buffer sealed for other settings (digest "
                         f"{sealed.get('digest')}); set another expert_dir or remove it")
        return
    if sealed is not None and isinstance(sealed.get("count"), int):
        buffer.count = max(buffer.count, sealed["count"])  # never shrink a sealed buffer
    try:
        ExpertBuffer.open(folder, key, min_count=buffer.count)
        buffer.state, buffer.detail = COMPLETE, ""
        return
    except ExpertBufferError:
        pass
    buffer.missing = missing_experts(config, folder, buffer.count, data)
    started = folder.is_dir() and any(folder.iterdir())
    buffer.state = PARTIAL if started else MISSING
    buffer.detail = f"{len(buffer.missing)} of {buffer.count} experts to train"
    if started and not buffer.missing:
        buffer.detail = "every expert is there, the manifest is not: to seal"


def _manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or unreadable: the buffer is resealed once its experts exist
    return manifest if isinstance(manifest, dict) else None


def describe(trials: list[Trial]) -> list[dict[str, Any]]:
    """Dry-run rows, one per buffer, checked on this machine without downloading anything."""
    wanted = [(t.key, t.values()) for t in trials if needs_experts(t)]
    return [buffer.row() for buffer in check_buffers(wanted, download=False)]


# --- the stage -------------------------------------------------------------------------------


def prepare(
    spec: SweepSpec, trials: list[Trial], console: Console | None = None,
    on_sealed: Callable[[Buffer, str], None] | None = None,
) -> list[Buffer]:
    """Make every buffer `trials` need complete; Ray must be initialised. `on_sealed(buffer,
    manifest text)` follows each buffer sealed here. Raises ExpertStageError."""
    import ray

    wanted = [(t.key, t.values()) for t in trials if needs_experts(t)]
    if not wanted:
        return []
    console = console or Console(stderr=True)
    cpus, gpus = spec.resources.cpu, spec.resources.gpu
    buffers = _get(ray.remote(check_buffers).options(num_cpus=cpus).remote(wanted), "checking")
    bad = [b for b in buffers if b.state in (REFUSED, UNKNOWN)]
    if bad:
        raise ExpertStageError("\n".join(f"buffer {b.digest or '?'} for trials "
                                         f"{', '.join(b.trials)}: {b.detail}" for b in bad))
    for buffer in buffers:
        what = "reusing" if buffer.state == COMPLETE else f"{buffer.state}, {buffer.detail}"
        _say(console, f"experts {buffer.digest}: {what}; {buffer.count} experts in "
                      f"{buffer.directory} for {len(buffer.trials)} trial(s)")

    _train(buffers, ray.remote(_train_one).options(num_cpus=cpus, num_gpus=gpus), cpus, console)
    todo = [b for b in buffers if b.state != COMPLETE]
    seal = ray.remote(_seal).options(num_cpus=cpus)
    refs = [seal.remote(b.config, b.directory, b.count) for b in todo]
    for buffer, ref in zip(todo, refs, strict=True):
        manifest = _get(ref, f"sealing buffer {buffer.digest}")
        buffer.state, buffer.detail = COMPLETE, ""
        _say(console, f"experts {buffer.digest}: sealed {buffer.count} experts")
        if on_sealed is not None:
            on_sealed(buffer, manifest)
    return buffers


def _train(buffers: list[Buffer], task: Any, cpus: float, console: Console) -> None:
    """Every missing expert as one Ray task; finished ones stay on disk even if others fail."""
    import ray

    pending = {task.remote(b.config, i, b.directory, cpus): (b, i)
               for b in buffers for i in b.missing}
    total, failures = len(pending), []
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        buffer, index = pending.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as exc:
            failures.append(f"buffer {buffer.digest}, expert {index}: {_cause(exc)}")
            continue
        buffer.trained.append(index)
        _say(console, f"experts {buffer.digest}: expert {index} trained "
                      f"({total - len(pending)}/{total})")
    for buffer in buffers:
        buffer.trained.sort()
    if failures:
        raise ExpertStageError("\n".join(failures) + "\nthe experts that finished are kept; "
                               "launch again to train the rest")


def _train_one(config: dict[str, Any], index: int, directory: str, cpus: float) -> str:
    torch.set_num_threads(max(1, int(cpus)))  # the task's share of the node, not every core
    return str(train_expert(Config.model_validate(config), index, directory))


def _seal(values: dict[str, Any], directory: str, count: int) -> str:
    """Write the manifest, open the buffer as a trial will, and return the manifest's text."""
    config = Config.model_validate(values)
    data = load_for(config)
    path = write_manifest(config, directory, count, data)
    ExpertBuffer.open(directory, expert_key(config, data), min_count=count)
    return path.read_text(encoding="utf-8")


def _get(ref: Any, what: str) -> Any:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        raise ExpertStageError(f"{what}: {_cause(exc)}") from None


def _cause(exc: Exception) -> str:
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the task's exception
    return f"{type(cause).__name__}: {cause}"


def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False)


__all__ = ["Buffer", "ExpertStageError", "check_buffers", "describe", "needs_experts",
           "prepare"]
