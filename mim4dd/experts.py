"""Expert trajectories for trajectory matching: trained once per key, stored, verified, streamed.

An expert is a ConvNet trained on the real train split (SGD, no momentum, no weight decay, DSA);
its flat parameters are saved at initialisation and after every epoch. A buffer is a folder:

* ``expert_{i}.safetensors`` - tensor ``trajectory`` [epochs + 1, P] float32, with the key's
  digest in the file's metadata; each is written under a temporary name and renamed into place;
* ``manifest.json`` - the key, its digest, the count, the shapes, the parameter layout and the
  size and sha256 of every file; written last, once every expert exists.

The key holds everything an expert depends on (dataset and split, ZCA whitening, model,
augmentation, epochs, optimiser), so a buffer is reused by any run with the same key and
refused by any other. A missing manifest, a missing or truncated file or a checksum mismatch
raises `ExpertBufferError`; nothing is ever unpickled. Distillation reads two rows of one file
per step, so no more than one trajectory's pages are ever touched at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from mim4dd.augment import DSA
from mim4dd.config import Config
from mim4dd.data import RealData, candidate_roots, load_for
from mim4dd.atomic import write_atomic
from mim4dd.device import resolve_device
from mim4dd.memory import keep_freed_memory
from mim4dd.flat import FlatParams
from mim4dd.models import build_model

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSOR = "trajectory"
EXPERT_STREAM = 2  # expert i is seeded by SeedSequence([EXPERT_STREAM, i]), apart from runs
TRAIN_COMMAND = "mim4dd experts"
_HASH_CHUNK = 1 << 24
# (expert index, epochs done, its mean training loss that epoch; None: trained before)
ExpertCallback = Callable[[int, int, "float | None"], None]


class ExpertBufferError(ValueError):
    """An expert buffer is missing, partial, corrupt or was trained for other settings."""


def expert_key(config: Config, data: RealData) -> dict:
    """Everything an expert trajectory depends on; runs that agree on it share a buffer.
    `data` must be in the config's space (whitened when config.zca), as `load_for` returns it:
    the key records the space experts are actually trained in, so it cannot lie."""
    info = data.info
    if config.zca != (data.zca is not None):
        raise ExpertBufferError(
            f"config.zca is {config.zca} but the data given is "
            f"{'whitened' if data.zca is not None else 'not whitened'}; load it with "
            "mim4dd.data.load_for(config)"
        )
    return {
        "format_version": FORMAT_VERSION,
        "dataset": info.name,
        "image_shape": list(data.image_shape),
        "num_classes": info.num_classes,
        # Experts train on the train split only, which depends on the held-out validation split.
        "split": {"val_fraction": config.val_fraction, "seed": config.split_seed,
                  "train_size": len(data.train)},
        "model": config.model.model_dump(mode="json"),
        "dsa_strategy": DSA(config.dsa_strategy, drop_flip=info.is_digits).strategy,
        # False, or the whitening's settings (fitted on this train split, so the split fixes it).
        "zca": data.zca is not None and {"eps": data.zca.eps, "input": "pixels"},
        "epochs": config.expert_train_epochs,
        "optimizer": {"lr": config.expert_lr, "batch": config.expert_batch, "momentum": 0.0,
                      "weight_decay": 0.0},
    }


def key_digest(key: dict) -> str:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expert_dir(config: Config, data: RealData) -> Path:
    """`config.expert_dir`, or `<data cache>/experts/<dataset>-<key digest>`."""
    if config.expert_dir:
        return Path(config.expert_dir).expanduser()
    cache = candidate_roots(config.data_root)[0]
    return cache / "experts" / f"{data.info.name}-{key_digest(expert_key(config, data))}"


def expert_seed(index: int) -> int:
    return int(np.random.SeedSequence([EXPERT_STREAM, index]).generate_state(1, np.uint64)[0] >> 1)


def expert_file(index: int) -> str:
    return f"expert_{index}.safetensors"


def _template(config: Config, data: RealData) -> FlatParams:
    info = data.info
    with torch.device("meta"):
        net = build_model(info.channels, info.image_size, info.num_classes, config.model)
    return FlatParams(net)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- training -------------------------------------------------------------------------------


def train_expert(
    config: Config, index: int, out_dir: str | Path, data: RealData | None = None,
    callback: ExpertCallback | None = None,
) -> Path:
    """Train expert `index` and write its trajectory; `callback(index, epoch, loss)` after each
    epoch, `loss` its mean training loss (one host read per epoch).

    One expert per call, so experts can be trained in parallel (say, as Ray tasks) and the
    manifest written afterwards with `write_manifest`.
    """

    data = data or load_for(config)
    digest = key_digest(expert_key(config, data))  # first: refuses data in the wrong space
    device = resolve_device(config.device)
    keep_freed_memory()
    info = data.info
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = expert_seed(index)
    net = build_model(info.channels, info.image_size, info.num_classes, config.model, seed)
    net = net.to(device)
    flat = FlatParams(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.expert_lr)
    dsa = DSA(config.dsa_strategy, drop_flip=info.is_digits)
    generator = torch.Generator().manual_seed(seed)
    images, labels = data.train.images.to(device), data.train.labels.to(device)

    snapshots = [flat.flatten(net).cpu()]
    for epoch in range(config.expert_train_epochs):
        order = torch.randperm(len(labels), generator=generator).to(device)
        batches = order.split(config.expert_batch)
        epoch_loss = torch.zeros((), device=device)
        for index_batch in batches:
            x = dsa(images[index_batch], generator)
            loss = F.cross_entropy(net(x), labels[index_batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach()  # summed on the device: no host read per step
        snapshots.append(flat.flatten(net).cpu())
        if callback is not None:
            callback(index, epoch + 1, epoch_loss.item() / len(batches))
    trajectory = torch.stack(snapshots).to(torch.float32).contiguous()
    if not torch.isfinite(trajectory).all():
        raise ExpertBufferError(f"expert {index} diverged (non-finite weights); lower expert_lr")
    metadata = {"digest": digest, "index": str(index)}
    path = out_dir / expert_file(index)
    write_atomic(path, lambda p: safetensors.torch.save_file({TENSOR: trajectory}, p, metadata))
    return path


def _finished(path: Path, digest: str, shape: list[int]) -> bool:
    """A complete expert file written for this key (files are renamed into place whole)."""
    try:
        with safe_open(path, framework="pt") as handle:
            found = list(handle.get_slice(TENSOR).get_shape())
            return (handle.metadata() or {}).get("digest") == digest and found == shape
    except (OSError, SafetensorError, KeyError):
        return False


def missing_experts(
    config: Config, out_dir: str | Path, count: int, data: RealData
) -> list[int]:
    """Experts among 0..count-1 with no complete file for this key (absent, cut short, other)."""
    digest = key_digest(expert_key(config, data))
    shape = [config.expert_train_epochs + 1, _template(config, data).size]
    return [i for i in range(count) if not _finished(Path(out_dir) / expert_file(i), digest, shape)]


def write_manifest(config: Config, out_dir: str | Path, count: int, data: RealData) -> Path:
    """Check experts 0..count-1 exist for this key, then write the manifest that seals them."""
    out_dir = Path(out_dir)
    key = expert_key(config, data)
    digest = key_digest(key)
    flat = _template(config, data)
    shape = [config.expert_train_epochs + 1, flat.size]
    files = {}
    for index in range(count):
        path = out_dir / expert_file(index)
        if not _finished(path, digest, shape):
            raise ExpertBufferError(f"{path} is missing, unreadable or not for this key")
        files[path.name] = {"sha256": _sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "digest": digest,
        "count": count,
        "shape": shape,
        "params": [[n, list(s)] for n, s in zip(flat.names, flat.shapes, strict=True)],
        "files": files,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = out_dir / MANIFEST_FILE
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path


def train_experts(
    config: Config, num_experts: int | None = None, out_dir: str | Path | None = None,
    callback: ExpertCallback | None = None, data: RealData | None = None,
) -> ExpertBuffer:
    """Train the buffer for `config` (`config.num_experts` by default) and open it.

    Idempotent: experts already written for this key are kept (`callback(i, epochs, None)`
    reports them), so an interrupted run resumes, and a larger count extends the buffer.
    """
    data = data or load_for(config)
    out_dir = Path(out_dir) if out_dir is not None else expert_dir(config, data)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = expert_key(config, data)
    count = num_experts or config.num_experts
    try:  # never shrink a sealed buffer
        count = max(count, ExpertBuffer.open(out_dir, key).count)
    except ExpertBufferError:
        pass
    missing = set(missing_experts(config, out_dir, count, data))
    for index in range(count):
        if index not in missing:
            if callback is not None:
                callback(index, config.expert_train_epochs, None)
            continue
        train_expert(config, index, out_dir, data, callback)
    write_manifest(config, out_dir, count, data)
    return ExpertBuffer.open(out_dir, key, min_count=count)


# --- reading --------------------------------------------------------------------------------


def _missing_message(directory: Path) -> str:
    partial = sorted(p.name for p in directory.glob("expert_*.safetensors"))
    state = (
        f"it holds {len(partial)} expert file(s) but no {MANIFEST_FILE}: training was interrupted"
        if partial else "no expert trajectories there"
    )
    return (
        f"no usable expert buffer at {directory} ({state}). Trajectory matching needs expert "
        f"trajectories, trained once per (dataset, model, augmentation, epochs): run "
        f"`{TRAIN_COMMAND}` with the same --config/--set options as this run "
        "(or mim4dd.experts.train_experts(config))."
    )


def _memory_mapped(path: Path) -> torch.Tensor:
    """The trajectory tensor of an expert file, mapped rather than read: a safetensors file is
    an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets) and the
    raw data. Copy-on-write, so the tensor is writable and the file never changes."""
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        entry = json.loads(handle.read(header_size))[TENSOR]
    if entry["dtype"] != "F32":
        raise ExpertBufferError(f"{path}: trajectory of dtype {entry['dtype']}, expected F32; "
                                f"retrain it with `{TRAIN_COMMAND}`")
    start, _ = entry["data_offsets"]
    array = np.memmap(path, dtype=np.float32, mode="c", offset=8 + header_size + start,
                      shape=tuple(entry["shape"]))
    return torch.from_numpy(array)


class ExpertBuffer:
    """A verified buffer; trajectories are read through memory maps on demand, never all at once."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = directory
        self.manifest = manifest
        # Each expert's file, checked (sha256) and memory-mapped once per process: a step reads
        # its two rows from the mapping, never opening a file (the OS keeps hot pages cached).
        self._mapped: dict[int, torch.Tensor] = {}

    @classmethod
    def open(cls, directory: str | Path, expected_key: dict, min_count: int = 1) -> ExpertBuffer:
        """Check manifest, key, count and every file's presence and size; else raise."""
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not path.is_file():
            raise ExpertBufferError(_missing_message(directory))
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            files, count, shape = manifest["files"], int(manifest["count"]), manifest["shape"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExpertBufferError(f"{path}: unreadable manifest ({exc}); retrain with "
                                    f"`{TRAIN_COMMAND}`") from exc
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ExpertBufferError(f"{path}: format_version {manifest.get('format_version')!r}, "
                                    f"this mim4dd reads {FORMAT_VERSION}")
        if manifest.get("key") != expected_key:
            found = manifest.get("key") or {}
            diff = sorted(k for k in {*found, *expected_key} if found.get(k) != expected_key.get(k))
            detail = "; ".join(f"{k}: buffer {found.get(k)!r}, run {expected_key.get(k)!r}"
                               for k in diff)
            raise ExpertBufferError(f"the buffer at {directory} was trained for other settings "
                                    f"({detail}); use another expert_dir or `{TRAIN_COMMAND}`")
        if count < min_count:
            raise ExpertBufferError(f"the buffer at {directory} holds {count} experts, the run "
                                    f"asks for {min_count} (num_experts); extend it with "
                                    f"`{TRAIN_COMMAND}`")
        for index in range(count):
            file = directory / expert_file(index)
            spec = files.get(file.name)
            if spec is None or not file.is_file() or file.stat().st_size != spec.get("bytes"):
                raise ExpertBufferError(f"{file} is missing or truncated (partial buffer); "
                                        f"retrain it with `{TRAIN_COMMAND}`")
        if len(shape) != 2:
            raise ExpertBufferError(f"{path}: shape must be [epochs + 1, parameters]")
        return cls(directory, manifest)

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def epochs(self) -> int:
        return int(self.manifest["shape"][0]) - 1

    @property
    def num_params(self) -> int:
        return int(self.manifest["shape"][1])

    def _trajectory(self, index: int) -> torch.Tensor:
        """Expert `index`'s trajectory, epochs + 1 x P, memory-mapped from its checked file."""
        if index in self._mapped:
            return self._mapped[index]
        if not 0 <= index < self.count:
            raise IndexError(f"expert {index} not in a buffer of {self.count}")
        path = self.directory / expert_file(index)
        expected = self.manifest["files"][path.name]["sha256"]
        if _sha256_file(path) != expected:
            raise ExpertBufferError(f"{path}: sha256 checksum mismatch with {MANIFEST_FILE}; "
                                    f"the file is corrupt, retrain it with `{TRAIN_COMMAND}`")
        self._mapped[index] = _memory_mapped(path)
        return self._mapped[index]

    def rows(self, index: int, epochs: list[int]) -> torch.Tensor:
        """Expert `index`'s parameters at the given epochs, len(epochs) x P (a copy)."""
        trajectory = self._trajectory(index)
        return torch.stack([trajectory[e] for e in epochs])

    def trajectory(self, index: int) -> torch.Tensor:
        """The whole trajectory of expert `index`: epochs + 1 x P."""
        return self.rows(index, list(range(self.epochs + 1)))


__all__ = [
    "ExpertBuffer", "ExpertBufferError", "expert_dir", "expert_key", "key_digest",
    "ExpertCallback", "missing_experts", "train_expert", "train_experts", "write_manifest",
]
