"""Synthetic sets: the product of a distillation, saved as a self-describing, checked directory.

A saved set is a directory holding

* ``synset.safetensors`` - ``images`` (N x C x H x W float32, normalised with the dataset's
  mean/std, or ZCA-whitened), ``labels`` (N int64), for trajectory matching a learned scalar
  ``lr``, and for a ZCA set its whitening transform (``zca_mean``, ``zca_basis``,
  ``zca_scale``: see mim4dd/zca.py), so the one checksum guards images and transform alike;
* ``manifest.json`` - everything needed to use and reproduce the set (dataset, class names,
  normalisation, ZCA settings, full config, evaluation protocol, library versions) plus the
  SHA-256 and the shapes/dtypes of the tensors file;
* ``grid.png`` - the images back in pixels (de-normalised or un-whitened), one row per class.

Loading never unpickles anything: tensors come from safetensors, and only after the file's
checksum matched the manifest, so a tampered or truncated file is rejected before parsing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch.utils.data import TensorDataset

from mim4dd.atomic import stage
from mim4dd.zca import TENSOR_NAMES as ZCA_TENSORS
from mim4dd.zca import ZCA

FORMAT_VERSION = 1

TENSORS_FILE = "synset.safetensors"
MANIFEST_FILE = "manifest.json"
GRID_FILE = "grid.png"
MAX_MANIFEST_BYTES = 16 << 20
MAX_TENSORS_BYTES = 4 << 30  # 1,000 classes x IPC 50 at 64 x 64 x 3 is 2.5 GB

GRID_PADDING = 2
# Cells smaller than this are upscaled (nearest) so tiny images stay readable in the PNG: a
# 28-pixel Fashion-MNIST image doubles, an 8-pixel digit grows 7x.
GRID_MIN_CELL = 56
GRID_FONT_PX = 14  # the class names left of each row, in PIL's built-in font
GRID_LABEL_GAP = 6  # pixels around a class name

_DTYPES = {"images": torch.float32, "labels": torch.int64, "lr": torch.float32,
           **dict.fromkeys(ZCA_TENSORS, torch.float32)}
# Facts about one saved file, not about the set; dropped on load so a loaded manifest
# equals the one that was saved.
_FILE_KEYS = ("sha256", "tensors")


class SyntheticSetError(ValueError):
    """A synthetic set, or one of its files, is missing, malformed or inconsistent."""


def _mim4dd_version() -> str:
    try:
        return metadata.version("mim4dd")
    except metadata.PackageNotFoundError:  # running from a source checkout
        return "0+unknown"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_json(value: Any, what: str) -> None:
    # Fail at creation, not hours later at save time, and keep the file strict JSON.
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SyntheticSetError(f"{what} must be JSON-serialisable: {exc}") from exc


def _as_lr(lr: Any) -> torch.Tensor | None:
    if lr is None:
        return None
    lr = torch.as_tensor(lr).detach()
    if lr.numel() != 1:
        raise SyntheticSetError(f"lr must be a scalar, got shape {list(lr.shape)}")
    return lr.reshape(()).to(device="cpu", dtype=torch.float32, copy=True)


def _check_tensors(
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: torch.Tensor | None,
    manifest: dict,
    where: str,
) -> None:
    """Raise SyntheticSetError (prefixed with `where`) unless the tensors fit the manifest."""

    def fail(message: str) -> None:
        raise SyntheticSetError(f"{where}: {message}")

    if images.dtype != torch.float32 or images.dim() != 4:
        fail(f"images must be float32 N x C x H x W, got {images.dtype} {list(images.shape)}")
    if list(images.shape[1:]) != list(manifest["image_shape"]):
        fail(f"images are {list(images.shape[1:])}, manifest says {manifest['image_shape']}")
    if labels.dtype != torch.int64 or labels.dim() != 1:
        fail(f"labels must be a 1-D int64 tensor, got {labels.dtype} {list(labels.shape)}")
    if len(labels) != len(images):
        fail(f"{len(labels)} labels for {len(images)} images")
    if lr is not None and (lr.dtype != torch.float32 or lr.dim() != 0):
        fail(f"lr must be a float32 scalar, got {lr.dtype} {list(lr.shape)}")
    if not torch.isfinite(images).all():
        fail("images hold NaN or infinite values")
    if lr is not None and not (torch.isfinite(lr) and lr > 0):
        fail(f"lr must be a positive finite step size, got {float(lr)}")
    num_classes = manifest["num_classes"]
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        fail(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    if (counts != manifest["ipc"]).any():
        fail(f"expected {manifest['ipc']} images for each class, got counts {counts.tolist()}")


def _check_manifest(manifest: Any, where: str) -> None:
    """Check the fields load relies on, so a bad manifest gives a message, not a KeyError."""
    if not isinstance(manifest, dict):
        raise SyntheticSetError(f"{where}: expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise SyntheticSetError(
            f"{where}: format_version is {version!r}, this mim4dd reads {FORMAT_VERSION}"
        )
    expected = {
        "num_classes": int, "class_names": list, "ipc": int, "image_shape": list,
        "normalisation": dict, "sha256": str, "tensors": dict,
    }
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind):
            raise SyntheticSetError(f"{where}: field {key!r} missing or not a {kind.__name__}")
    if manifest["num_classes"] < 1 or manifest["ipc"] < 1:
        raise SyntheticSetError(f"{where}: num_classes and ipc must be positive")
    if len(manifest["class_names"]) != manifest["num_classes"]:
        raise SyntheticSetError(f"{where}: num_classes does not match class_names")
    shape = manifest["image_shape"]
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise SyntheticSetError(f"{where}: image_shape must be [C, H, W], got {shape}")
    norm = manifest["normalisation"]
    for key in ("mean", "std"):
        values = norm.get(key)
        if not (isinstance(values, list) and len(values) == shape[0]
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            raise SyntheticSetError(f"{where}: normalisation.{key} needs {shape[0]} numbers")
    zca = manifest.get("zca")  # absent in sets saved before ZCA existed: not whitened
    if zca is not None:
        eps = zca.get("eps") if isinstance(zca, dict) else None
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise SyntheticSetError(f"{where}: zca must be null or hold a positive eps")


def _read_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (never a device or a pipe behind a
    link, which could be endless); SyntheticSetError otherwise."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise SyntheticSetError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise SyntheticSetError(f"{path}: {info.st_size} bytes, above the {limit} a set "
                                    "file may have")
        return path.read_bytes()
    except FileNotFoundError:
        raise SyntheticSetError(f"{path}: file not found") from None
    except OSError as exc:
        raise SyntheticSetError(f"{path}: cannot read: {exc}") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def grid_size(class_names: list[str], ipc: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid.png that `save` writes for such a set: a column
    of class names, then one row of `ipc` upscaled images per class."""
    scale = max(1, GRID_MIN_CELL // min(height, width))
    pad = GRID_PADDING
    return (_label_width(class_names) + ipc * (width * scale + pad) + pad,
            len(class_names) * (height * scale + pad) + pad)


def _grid_font():
    from PIL import ImageFont

    return ImageFont.load_default(size=GRID_FONT_PX)


def _label_width(class_names: list[str]) -> int:
    font = _grid_font()
    return max(math.ceil(font.getlength(name)) for name in class_names) + 2 * GRID_LABEL_GAP


@dataclass
class SyntheticSet:
    images: torch.Tensor
    labels: torch.Tensor
    manifest: dict
    lr: torch.Tensor | None = None
    zca: ZCA | None = None  # the whitening of the set's space, for a ZCA set

    @classmethod
    def create(
        cls,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        dataset: str,
        class_names: list[str],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        config: dict,
        eval_protocol: dict,
        lr: torch.Tensor | float | None = None,
        extra: dict | None = None,
        zca: ZCA | None = None,
    ) -> SyntheticSet:
        """Package distilled tensors with the manifest that makes them reusable. A set
        distilled in ZCA space (config zca: true) must carry the transform (`RealData.zca`)."""
        # Copies, so a distillation that keeps optimising its tensors cannot change the set.
        images = images.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
        if labels.is_floating_point() or labels.is_complex():
            raise SyntheticSetError(f"labels must be integers, got {labels.dtype}")
        labels = labels.detach().to(device="cpu", dtype=torch.int64, copy=True).contiguous()
        if images.dim() != 4 or len(images) == 0:
            raise SyntheticSetError(f"images must be N x C x H x W, got {list(images.shape)}")
        num_classes = len(class_names)
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise SyntheticSetError(
                f"mean/std need {channels} values (one per channel), got {len(mean)}/{len(std)}"
            )
        if num_classes == 0:
            raise SyntheticSetError("class_names must not be empty")
        # _check_tensors below rejects sets whose classes are not all this size.
        ipc = len(images) // num_classes
        for value, what in ((config, "config"), (eval_protocol, "eval_protocol")):
            _check_json(value, what)
        if "zca" in config and bool(config["zca"]) != (zca is not None):
            raise SyntheticSetError(
                f"config zca is {config['zca']} but the set was given "
                f"{'a' if zca is not None else 'no'} ZCA transform (pass zca=data.zca)"
            )
        if zca is not None and zca.dim != images[0].numel():
            raise SyntheticSetError(f"the ZCA transform is for {zca.dim} values per image, "
                                    f"the images have {images[0].numel()}")
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            "num_classes": num_classes,
            "class_names": list(class_names),
            "ipc": ipc,
            "image_shape": list(images.shape[1:]),
            "normalisation": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
            # The images' space when whitened: normalise()/denormalised() convert pixels.
            "zca": None if zca is None else {**zca.describe(), "input": "pixels in [0, 1]"},
            "config": config,
            "eval_protocol": eval_protocol,
            "versions": {
                "mim4dd": _mim4dd_version(),
                "torch": torch.__version__,
                "torchvision": metadata.version("torchvision"),
                "python": platform.python_version(),
            },
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if extra:
            clash = sorted(set(extra) & (set(manifest) | set(_FILE_KEYS)))
            if clash:
                raise SyntheticSetError(f"extra must not override manifest fields {clash}")
            _check_json(extra, "extra")
            manifest.update(extra)
        lr = _as_lr(lr)
        _check_tensors(images, labels, lr, manifest, "synthetic set")
        return cls(images=images, labels=labels, manifest=manifest, lr=lr, zca=zca)

    # --- properties -----------------------------------------------------------------------

    @property
    def ipc(self) -> int:
        return int(self.manifest["ipc"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __str__(self) -> str:
        """What a person asks of a set first: what it is, how big, how it was made."""
        shape = "×".join(map(str, self.image_shape))
        config = self.manifest.get("config") or {}
        made = ", ".join(f"{k} {config[k]}" for k in ("base", "lam", "seed") if k in config)
        lr = "" if self.lr is None else f", learned lr {float(self.lr):.4g}"
        zca = ", ZCA-whitened" if self.zca is not None else ""
        per_class = f"{self.ipc} image{'s' if self.ipc != 1 else ''} per class"
        return (f"{self.manifest['dataset']} synthetic set: {self.num_classes} classes, "
                f"{per_class}, {shape}{zca}{lr}" + (f" ({made})" if made else ""))

    # --- use ------------------------------------------------------------------------------

    def denormalised(self) -> torch.Tensor:
        """Images back in pixel space (roughly [0, 1]; not clamped): un-whitened for a ZCA set."""
        if self.zca is not None:
            return self.zca.unwhiten(self.images)
        mean, std = self._mean_std()
        return self.images * std + mean

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Real images (pixels in [0, 1], N x C x H x W, as ToTensor gives them) into this set's
        space, exactly as its training data was: whitened by the stored transform for a ZCA set,
        mean/std-normalised otherwise. The inverse of `denormalised`."""
        if self.zca is not None:
            return self.zca.whiten(pixels)
        mean, std = self._mean_std(pixels)
        return (pixels - mean) / std

    def _mean_std(self, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        like = self.images if like is None else like
        norm = self.manifest["normalisation"]
        kw = {"device": like.device, "dtype": like.dtype}
        mean = torch.tensor(norm["mean"], **kw).view(1, -1, 1, 1)
        return mean, torch.tensor(norm["std"], **kw).view(1, -1, 1, 1)

    def to_dataset(self) -> TensorDataset:
        """(image, label) pairs in the set's space (normalised, or whitened for a ZCA set), as
        the real data it was distilled from, ready for a DataLoader."""
        return TensorDataset(self.images.detach(), self.labels.detach())

    # --- persistence ----------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the set to `directory` (created if needed), replacing any set already there.

        Every file is staged under a temporary name and renamed into place, manifest last:
        a crash leaves either the old set, or files whose checksum the manifest rejects.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "images": self.images.detach().to("cpu", torch.float32).contiguous(),
            "labels": self.labels.detach().to("cpu", torch.int64).contiguous(),
        }
        if self.lr is not None:
            tensors["lr"] = _as_lr(self.lr)
        if self.zca is not None:
            tensors.update(self.zca.tensors())
        _check_tensors(
            tensors["images"], tensors["labels"], tensors.get("lr"), self.manifest,
            "synthetic set",
        )
        staged: dict[str, Path] = {}
        try:
            staged[TENSORS_FILE] = stage(
                directory, TENSORS_FILE, lambda p: safetensors.torch.save_file(tensors, p)
            )
            staged[GRID_FILE] = stage(directory, GRID_FILE, self._write_grid)
            manifest = {
                **self.manifest,
                "sha256": _sha256(staged[TENSORS_FILE].read_bytes()),
                "tensors": {
                    name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
                    for name, t in tensors.items()
                },
            }
            text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
            staged[MANIFEST_FILE] = stage(
                directory, MANIFEST_FILE, lambda p: p.write_text(text, encoding="utf-8")
            )
            for name in (TENSORS_FILE, GRID_FILE, MANIFEST_FILE):
                os.replace(staged.pop(name), directory / name)
        finally:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)
        self._fsync_dir(directory)
        return directory

    def _write_grid(self, path: Path) -> None:
        """grid.png: one row per class, its name on the left, its images upscaled (nearest)
        to at least GRID_MIN_CELL pixels, in pixel space (un-whitened for a ZCA set)."""
        from PIL import Image, ImageDraw

        images = self.denormalised().detach().cpu().clamp(0, 1)
        images = images[torch.argsort(self.labels.cpu(), stable=True)]  # row = class
        pixels = images.mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1)  # grey as RGB
        height, width = pixels.shape[-2:]
        scale = max(1, GRID_MIN_CELL // min(height, width))
        pixels = pixels.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
        pad, rows, cols = GRID_PADDING, self.num_classes, self.ipc
        # Each image padded below and right, tiled rows x cols, then the top and left padding.
        tiles = F.pad(pixels, (0, pad, 0, pad))
        step_y, step_x = tiles.shape[-2:]
        tiled = tiles.view(rows, cols, 3, step_y, step_x).permute(0, 3, 1, 4, 2)
        cells = F.pad(tiled.reshape(rows * step_y, cols * step_x, 3), (0, 0, pad, 0, pad, 0))
        names = self.manifest["class_names"]
        label = _label_width(names)
        canvas = Image.new("RGB", (label + cells.shape[1], cells.shape[0]))
        canvas.paste(Image.fromarray(cells.numpy()), (label, 0))
        draw, font = ImageDraw.Draw(canvas), _grid_font()
        for row, name in enumerate(names):
            centre = pad + row * step_y + (step_y - pad) / 2
            draw.text((GRID_LABEL_GAP, centre), name, fill=(230, 230, 230), font=font,
                      anchor="lm")
        canvas.save(path, format="png")

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        # Makes the renames durable; not every platform can open a directory.
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> SyntheticSet:
        """Read and verify a set written by `save`; any problem raises SyntheticSetError."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        tensors_path = directory / TENSORS_FILE
        try:
            manifest = json.loads(_read_file(manifest_path, MAX_MANIFEST_BYTES).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise SyntheticSetError(f"{manifest_path}: cannot read JSON: {exc}") from None
        _check_manifest(manifest, str(manifest_path))

        # Read once, hash those bytes, parse those bytes: nothing unverified is ever parsed.
        data = _read_file(tensors_path, MAX_TENSORS_BYTES)
        digest = _sha256(data)
        if digest != manifest["sha256"]:
            raise SyntheticSetError(
                f"{tensors_path}: sha256 checksum mismatch (file {digest}, "
                f"{MANIFEST_FILE} says {manifest['sha256']}); the file is corrupt or was modified"
            )
        try:
            tensors = safetensors.torch.load(data)
        except SafetensorError as exc:
            raise SyntheticSetError(f"{tensors_path}: not a valid safetensors file: {exc}") from exc

        declared = manifest["tensors"]
        if set(tensors) != set(declared) or not {"images", "labels"} <= set(tensors):
            raise SyntheticSetError(
                f"{tensors_path}: holds tensors {sorted(tensors)}, {MANIFEST_FILE} lists "
                f"{sorted(declared)} (need images, labels and optionally lr and the zca_* ones)"
            )
        for name, tensor in tensors.items():
            if name not in _DTYPES:
                raise SyntheticSetError(f"{tensors_path}: unexpected tensor {name!r}")
            spec = declared[name]
            found = {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
            if not isinstance(spec, dict) or found != {k: spec.get(k) for k in found}:
                raise SyntheticSetError(
                    f"{tensors_path}: tensor {name!r} is {found}, {MANIFEST_FILE} says {spec}"
                )
            if tensor.dtype != _DTYPES[name]:
                raise SyntheticSetError(
                    f"{tensors_path}: tensor {name!r} must be {_dtype_name(_DTYPES[name])}"
                )
        _check_tensors(
            tensors["images"], tensors["labels"], tensors.get("lr"), manifest, str(tensors_path)
        )
        zca = _stored_zca(tensors, manifest, str(tensors_path))

        for key in _FILE_KEYS:
            manifest.pop(key)
        lr = tensors.get("lr")
        return cls(
            images=tensors["images"].to(device),
            labels=tensors["labels"].to(device),
            manifest=manifest,
            lr=None if lr is None else lr.to(device),
            zca=zca,
        )


def _stored_zca(tensors: dict[str, torch.Tensor], manifest: dict, where: str) -> ZCA | None:
    """The transform a loaded set carries; a ZCA set without it (or one half stored) is refused,
    as its images would be read in the wrong space."""
    stored = [name for name in ZCA_TENSORS if name in tensors]
    whitened = manifest.get("zca") is not None
    if not stored and not whitened:
        return None
    if len(stored) != len(ZCA_TENSORS) or not whitened:
        raise SyntheticSetError(
            f"{where}: {MANIFEST_FILE} says zca={manifest.get('zca')}, the file holds ZCA "
            f"tensors {stored}; a ZCA set needs all of {list(ZCA_TENSORS)}, any other none"
        )
    try:
        zca = ZCA.from_tensors(tensors, manifest["zca"]["eps"])
    except ValueError as exc:
        raise SyntheticSetError(f"{where}: {exc}") from None
    if zca.dim != math.prod(manifest["image_shape"]):
        raise SyntheticSetError(f"{where}: the ZCA transform is for {zca.dim} values per "
                                f"image, image_shape is {manifest['image_shape']}")
    return zca


__all__ = [
    "FORMAT_VERSION",
    "SyntheticSet",
    "SyntheticSetError",
    "grid_size",
]
