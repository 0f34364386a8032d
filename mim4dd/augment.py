"""Differentiable siamese augmentation (DSA, Zhao & Bilen 2021).

Distillation compares real and synthetic images through a network, so both must be augmented
the same way and gradients must flow back into the synthetic pixels. Parameters are therefore
sampled once per step as one row per *group* (a class) and applied to any batch by indexing
rows with each sample's group; every op is a tensor expression, so ``apply`` is differentiable
with respect to the images and runs without Python loops over samples.

The transform is composed once per call: colour jitter, then a single ``grid_sample`` whose
affine matrix combines crop (translation), flip, scale and rotate, then a cutout mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
MODES = ("single", "all")

# Ranges of the reference DSA implementation.
SCALE_MAX = 1.2  # each axis scaled by a factor in [1/1.2, 1.2]
ROTATE_MAX_DEG = 15.0
CROP_RATIO = 0.125  # max translation, as a fraction of the image size
CUTOUT_RATIO = 0.5  # side of the cutout square, as a fraction of the image size

_GEOMETRIC = ("crop", "flip", "scale", "rotate")
_FIELDS = {  # the AugmentParams fields each op reads
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("crop",),
    "cutout": ("cutout", "cutout_centre"),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("angle",),
}


def validate_strategy(strategy: str) -> str:
    """Normalise a DSA strategy: 'none' (any case) or '' gives 'none'; otherwise
    '_'-separated op names from OPS without repeats. Raises ValueError otherwise."""
    text = strategy.strip().lower()
    if text in ("", "none"):
        return "none"
    ops = text.split("_")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(
            f"unknown DSA op(s) {unknown} in strategy {strategy!r}; "
            f"allowed ops: {', '.join(OPS)} (or 'none')"
        )
    repeated = sorted({op for op in ops if ops.count(op) > 1})
    if repeated:
        raise ValueError(f"DSA op(s) {repeated} repeated in strategy {strategy!r}")
    return text


def _round_half_up(value: float) -> int:
    # Python's round() rounds halves to even; the reference DSA rounds them up.
    return int(value + 0.5)


@dataclass
class AugmentParams:
    """Per-group augmentation parameters; every field has one row per group.

    Identity values (see ``identity``) leave an image unchanged, which is how an op that a
    group does not use is switched off without branching per sample.
    """

    brightness: torch.Tensor  # (G,) added to every pixel; identity 0
    saturation: torch.Tensor  # (G,) factor on the deviation from the channel mean; identity 1
    contrast: torch.Tensor  # (G,) factor on the deviation from the image mean; identity 1
    crop: torch.Tensor  # (G, 2) uniform u in [0, 1) for (x, y); shift floor(u(2m+1)) - m px
    flip: torch.Tensor  # (G,) bool, mirror horizontally
    scale: torch.Tensor  # (G, 2) sampling factors for (x, y); identity 1
    angle: torch.Tensor  # (G,) rotation in radians; identity 0
    cutout: torch.Tensor  # (G,) bool, whether a square is zeroed
    cutout_centre: torch.Tensor  # (G, 2) uniform u in [0, 1) locating the square's (x, y) centre

    @classmethod
    def identity(cls, num_groups: int, device: torch.device | str | None = None) -> AugmentParams:
        """Parameters that change nothing; a convenient start for hand-built transforms."""
        n = num_groups
        return cls(
            brightness=torch.zeros(n, device=device),
            saturation=torch.ones(n, device=device),
            contrast=torch.ones(n, device=device),
            crop=torch.full((n, 2), 0.5, device=device),  # u = 0.5 is a zero shift for any m
            flip=torch.zeros(n, dtype=torch.bool, device=device),
            scale=torch.ones(n, 2, device=device),
            angle=torch.zeros(n, device=device),
            cutout=torch.zeros(n, dtype=torch.bool, device=device),
            cutout_centre=torch.full((n, 2), 0.5, device=device),
        )

    @property
    def num_groups(self) -> int:
        return len(self.brightness)

    def to(self, device: torch.device | str | None) -> AugmentParams:
        return AugmentParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def rows(self, index: torch.Tensor) -> AugmentParams:
        """One row per entry of ``index`` (a sample's view of its group's parameters)."""
        return AugmentParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _pixel_shift(u: torch.Tensor, size: int) -> torch.Tensor:
    """Integer shift uniform in [-m, m] from u in [0, 1), m = round(CROP_RATIO * size)."""
    m = _round_half_up(CROP_RATIO * size)
    return (torch.floor(u * (2 * m + 1)) - m).clamp(-m, m)


def _color(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Brightness, then saturation, then contrast, as in the reference DSA."""
    x = x + p.brightness.view(-1, 1, 1, 1)
    channel_mean = x.mean(dim=1, keepdim=True)
    x = (x - channel_mean) * p.saturation.view(-1, 1, 1, 1) + channel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * p.contrast.view(-1, 1, 1, 1) + image_mean


def _affine(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Crop, flip, scale and rotate as one bilinear resampling with zero padding.

    Each op is a sampling matrix (output coordinate -> input coordinate) in the normalised
    coordinates of ``affine_grid`` with ``align_corners=False``, where one pixel is 2/size
    wide, so integer translations and flips land exactly on pixel centres.
    """
    n, _, h, w = x.shape
    opts = dict(dtype=x.dtype, device=x.device)
    eye = torch.eye(3, **opts).expand(n, 3, 3)

    shift_x = _pixel_shift(p.crop[:, 0], w).to(x.dtype)
    shift_y = _pixel_shift(p.crop[:, 1], h).to(x.dtype)
    crop = eye.clone()
    crop[:, 0, 2] = -2 * shift_x / w  # content moves by +shift, so sample from -shift
    crop[:, 1, 2] = -2 * shift_y / h

    flip = eye.clone()
    flip[:, 0, 0] = 1 - 2 * p.flip.to(x.dtype)

    scale = eye.clone()
    scale[:, 0, 0] = p.scale[:, 0].to(x.dtype)
    scale[:, 1, 1] = p.scale[:, 1].to(x.dtype)

    # Rotate in pixel units, then rescale the off-diagonal terms so that non-square images
    # are rotated rather than sheared in normalised coordinates.
    cos, sin = torch.cos(p.angle).to(x.dtype), torch.sin(p.angle).to(x.dtype)
    rotate = eye.clone()
    rotate[:, 0, 0] = cos
    rotate[:, 0, 1] = sin * h / w
    rotate[:, 1, 0] = -sin * w / h
    rotate[:, 1, 1] = cos

    # Applying op1 then op2 samples through M1 @ M2: order is crop, flip, scale, rotate.
    theta = (crop @ flip @ scale @ rotate)[:, :2, :]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _cutout(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Zero a square of side round(CUTOUT_RATIO * size) around a random centre, clipped."""
    _, _, h, w = x.shape

    def outside(size: int, u: torch.Tensor) -> torch.Tensor:
        # (N, size) mask of coordinates outside the square along one axis.
        side = _round_half_up(CUTOUT_RATIO * size)
        centre = torch.floor(u * (size + 1 - side % 2))  # reference's centre range
        start = centre - side // 2
        coord = torch.arange(size, device=x.device, dtype=u.dtype)
        return (coord < start[:, None]) | (coord >= start[:, None] + side)

    keep_rows = outside(h, p.cutout_centre[:, 1])[:, :, None]
    keep_cols = outside(w, p.cutout_centre[:, 0])[:, None, :]
    keep = keep_rows | keep_cols | ~p.cutout[:, None, None]
    return x * keep[:, None].to(x.dtype)


class DSA:
    """Differentiable siamese augmentation with a fixed strategy.

    ``mode="single"`` gives each group one op of the strategy, drawn uniformly (the reference
    DSA's default); ``mode="all"`` applies every op of the strategy.
    """

    def __init__(
        self, strategy: str = DEFAULT_STRATEGY, drop_flip: bool = False, mode: str = "single"
    ):
        if mode not in MODES:
            raise ValueError(f"unknown DSA mode {mode!r}; allowed: {', '.join(MODES)}")
        normalised = validate_strategy(strategy)
        ops = () if normalised == "none" else tuple(normalised.split("_"))
        if drop_flip:  # mirrored digits change meaning
            ops = tuple(op for op in ops if op != "flip")
        self.ops: tuple[str, ...] = ops
        self.strategy = "_".join(ops) if ops else "none"
        self.mode = mode
        self.enabled = bool(ops)

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r})"

    def sample(
        self, num_groups: int, generator: torch.Generator, device: torch.device | str | None = None
    ) -> AugmentParams:
        """Draw one row of parameters per group from ``generator`` only.

        Every op's parameters are drawn whatever the strategy, so the generator advances the
        same way for any enabled strategy; ops a group does not use are then set to identity.
        """
        n = num_groups
        params = AugmentParams.identity(n, device=generator.device)
        if not self.enabled:
            return params.to(device)

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device=generator.device)

        drawn = AugmentParams(
            brightness=rand(n) - 0.5,
            saturation=rand(n) * 2,
            contrast=rand(n) + 0.5,
            crop=rand(n, 2),
            flip=rand(n) < 0.5,
            scale=1 / SCALE_MAX + rand(n, 2) * (SCALE_MAX - 1 / SCALE_MAX),
            angle=(rand(n) * 2 - 1) * math.radians(ROTATE_MAX_DEG),
            cutout=torch.ones(n, dtype=torch.bool, device=generator.device),
            cutout_centre=rand(n, 2),
        )
        choice = torch.randint(len(self.ops), (n,), generator=generator, device=generator.device)
        for i, op in enumerate(self.ops):
            used = choice == i if self.mode == "single" else torch.ones_like(choice, dtype=bool)
            for name in _FIELDS[op]:
                value, identity = getattr(drawn, name), getattr(params, name)
                mask = used.view(-1, *([1] * (value.dim() - 1)))
                setattr(params, name, torch.where(mask, value, identity))
        return params.to(device)

    def apply(
        self, x: torch.Tensor, params: AugmentParams, groups: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Augment ``x`` (N x C x H x W); sample i uses row ``groups[i]`` of ``params``.

        ``groups=None`` means row i for sample i. Ops outside the strategy are skipped even if
        ``params`` sets them.
        """
        if not self.enabled:
            return x
        params = params.to(x.device)
        if groups is None:
            if params.num_groups != len(x):
                raise ValueError(
                    f"groups=None needs one parameter row per sample, got {params.num_groups} "
                    f"rows for {len(x)} samples"
                )
        else:
            params = params.rows(groups.to(x.device))
        # Hand-built params may set ops outside the strategy; those stay off.
        identity = AugmentParams.identity(len(x), device=x.device)
        for op in OPS:
            if op not in self.ops:
                for name in _FIELDS[op]:
                    setattr(params, name, getattr(identity, name))
        if "color" in self.ops:
            x = _color(x, params)
        if any(op in self.ops for op in _GEOMETRIC):
            x = _affine(x, params)
        if "cutout" in self.ops:
            x = _cutout(x, params)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment every sample independently."""
        return self.apply(x, self.sample(len(x), generator, device=x.device))


__all__ = ["OPS", "DEFAULT_STRATEGY", "AugmentParams", "DSA", "validate_strategy"]
