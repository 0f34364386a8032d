"""Typed configuration for every engine knob, with the paper's defaults.

One `Config` describes one distillation plus its evaluation. Sweep files address its fields
by dotted path (``lam``, ``ipc``, ``eval.epochs``, ``model.width``), so every knob a
researcher may want to grid over lives here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mim4dd.datasets import DATASETS, canonical_dataset_name
from mim4dd.bases import base_class, base_names, unknown_base_message


MAX_COUNT = 10_000_000  # iterations or epochs beyond this are a typo (1e20), not a plan


class StrictModel(BaseModel):
    """Unknown fields are errors, not silently ignored typos; inf and NaN are never a setting."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              strict=True)


class ModelConfig(StrictModel):
    """The ConvNet family of the standard dataset-distillation protocol."""

    width: int = Field(128, gt=0, description="channels of every conv layer")
    depth: int = Field(3, ge=1, le=6, description="number of conv blocks")
    norm: Literal["instance", "batch", "none"] = "instance"
    pooling: Literal["avg", "max", "none"] = "avg"


class EvalConfig(StrictModel):
    """Train `num_nets` fresh networks on a synthetic set and test them on the real test split."""

    num_nets: int = Field(5, ge=1, description="networks trained per evaluation")
    epochs: int = Field(300, ge=1, le=MAX_COUNT)
    lr: float = Field(0.01, gt=0, description="used when the set carries no learned lr")
    lr_decay_epoch_fraction: float = Field(0.5, gt=0, le=1, description="lr x0.1 at this point")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(256, gt=0)
    dsa: bool = Field(True, description="augment with the distillation's DSA strategy")
    seed: int = Field(0, ge=0, description="offset of the networks' seeds (see net_seeds)")
    net_seeds: Literal["per_run", "shared"] = Field(
        "per_run", description="per_run: network i of the run with seed s starts from a seed "
        "drawn from (s, eval.seed, i), so the spread over run seeds includes the networks' "
        "initialisation; shared: network i of every run starts from eval.seed + i, the same "
        "weights for every run seed (the spread over seeds then leaves initialisation out)",
    )
    parallel: bool | None = Field(
        None, description="train the networks together with vmap; None = on CUDA only (on CPU "
        "each conv already fills the cores, and vmap measured slower: see BENCHMARKS.md)",
    )
    models: list[str] = Field(
        default_factory=lambda: ["convnet"],
        description="architectures of the evaluation pool (mim4dd/zoo.py), each trained "
        "num_nets times; the first is the headline result; convnet is `model`. A string is "
        "read as a comma-separated list (--set eval.models=convnet,resnet18)",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _known_models(cls, value: list[str]) -> list[str]:
        from mim4dd.zoo import ARCHITECTURES, unknown_architecture_message

        if not value:
            raise ValueError("models needs at least one architecture")
        for name in value:
            if name not in ARCHITECTURES:
                raise ValueError(unknown_architecture_message(name))
        if repeated := sorted({name for name in value if value.count(name) > 1}):
            raise ValueError(f"models lists {', '.join(repeated)} more than once")
        return value


class Config(StrictModel):
    """One distillation run and its evaluation. Defaults and every choice: docs/method.md."""

    # data
    dataset: str = "FashionMNIST"
    data_root: str | None = Field(None, description="where datasets live; default: ~/.cache/mim4dd")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="held out of train for selection")
    split_seed: int = Field(
        0, ge=0, description="seed of the validation hold-out; apart from `seed` so every run "
        "seed sees the same split (and trajectory-matching experts are shared)",
    )
    # synthetic set
    ipc: int = Field(10, gt=0, description="synthetic images per class")
    init: Literal["real", "noise"] = "real"
    # objective
    base: str = Field(
        "dm", description="matching objective the MIM term is added to: dm, dc (DC/DSA), mtt, "
        "cafe, or a registered plugin (mim4dd/bases.py)"
    )
    preset: str | None = Field(
        None, description="per dataset x IPC hyper-parameters of the base (mim4dd/presets.yaml); "
        "fills only the fields this config does not set"
    )
    lam: float = Field(0.8, ge=0, description="weight of the MIM term; 0 is the base method")
    lam_mode: Literal["absolute", "relative"] = Field(
        "absolute", description="absolute: L_base + lam * L_MIM (the paper's Eq. 17); relative "
        "(our extension, not the paper's): the MIM term's image gradient is scaled to lam x "
        "the base's, so one lam means the same on every base (docs/method.md)"
    )
    tau: float = Field(0.1, gt=0, description="critic temperature")
    head_dim: int = Field(128, gt=0, description="output size of the per-block linear heads")
    mim_grid: int = Field(2, gt=0, description="feature maps are average-pooled to grid x grid")
    mim_blocks: list[int] | None = Field(None, description="1-based blocks used; None = all")
    lr_heads: float = Field(0.01, gt=0)
    mim_heads: Literal["learned", "fixed", "per_step"] = Field(
        "learned", description="learned: drawn once from the seed, trained with the images on "
        "L_MIM and kept across steps (our reading of the paper); fixed: drawn once, never "
        "trained (a fixed random projection); per_step: drawn anew every step and fitted to "
        "that step's features before they score the images (docs/method.md)"
    )
    mim_real_net: Literal["target", "start", "student"] = Field(
        "target", description="mtt only: the network the real images' MIM features come "
        "from: the expert at t + M (target), at t (start), or the student's end point"
    )
    # optimisation
    iterations: int = Field(5000, ge=0, le=MAX_COUNT)
    lr_img: float = Field(0.1, gt=0)
    momentum_img: float = Field(0.5, ge=0, lt=1)
    lr_milestones: list[int] = Field(default_factory=lambda: [1800, 2800])
    lr_gamma: float = Field(0.5, gt=0)
    batch_real: int = Field(256, gt=0, description="real images per class per iteration")
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    seed: int = Field(0, ge=0)
    # the network trained alongside the images: gradient matching (base dc; DSA when
    # dsa_strategy is not 'none') and cafe (outer_loop, inner_loop, lr_net, batch_train)
    outer_loop: int | None = Field(
        None, ge=1, description="image updates per freshly initialised network; None: by IPC (dc), 10 (cafe)"
    )
    inner_loop: int | None = Field(
        None, ge=0, description="epochs on the synthetic set after each matching step; None: by IPC (dc), 10 "
        "(cafe)"
    )
    dis_metric: Literal["ours", "mse", "cos"] = Field(
        "ours", description="gradient distance: per-output-row 1 - cos (ours), mse or cos"
    )
    lr_net: float = Field(0.01, gt=0, description="lr of the network trained between matches")
    batch_train: int = Field(256, gt=0, description="batch of that network's training")
    # trajectory matching (base mtt)
    syn_steps: int = Field(20, ge=1, description="student steps unrolled per iteration (N)")
    expert_epochs: int = Field(2, ge=1, description="expert epochs the student must cover (M)")
    max_start_epoch: int = Field(20, ge=1, description="start epoch t drawn from [0, this)")
    lr_lr: float = Field(1e-5, gt=0, description="lr of the learnable step size")
    lr_teacher: float = Field(0.01, gt=0, description="initial learnable step size of the student")
    syn_lr_max: float = Field(1.0, gt=0, description="a learned step size above this ends the run")
    batch_syn: int | None = Field(None, gt=0, description="student batch; None: all images")
    zca: bool = Field(
        False, description="ZCA-whiten every split (MTT's: kornia's formula, eps 0.1, fitted on "
        "the train split's pixels only); the transform travels with the synthetic set"
    )
    num_experts: int = Field(100, ge=1, description="expert trajectories sampled from")
    expert_train_epochs: int = Field(50, ge=1, description="epochs each expert is trained")
    expert_lr: float = Field(0.01, gt=0, description="experts' SGD lr (no momentum, no decay)")
    expert_batch: int = Field(256, gt=0, description="experts' batch size")
    expert_dir: str | None = Field(
        None, description="expert buffer folder; default <data cache>/experts/<key digest>"
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    compile: bool = Field(
        False, description="torch.compile the networks' forward passes (DM probe, evaluation "
        "networks): ~30% faster per pass after a one-off compile; falls back if it cannot"
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        return canonical_dataset_name(value)

    @field_validator("base")
    @classmethod
    def _registered_base(cls, value: str) -> str:
        if value not in base_names():
            raise ValueError(unknown_base_message(value))
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not a device (allowed: auto, cpu, cuda, cuda:N, mps)")
        return value

    @field_validator("dsa_strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        from mim4dd.augment import validate_strategy

        return validate_strategy(value)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        # Preset values go under the user's: an explicitly set field always wins.
        if isinstance(data, dict) and data.get("preset") is not None:
            from mim4dd.presets import preset_values

            data = {**preset_values(data.get("base", "dm"), data["preset"]), **data}
        return data

    @model_validator(mode="after")
    def _base_settings_fit(self) -> Config:
        base_class(self.base).check_config(self)  # what only this base needs
        return self

    @model_validator(mode="after")
    def _real_net_is_mtts(self) -> Config:
        if self.mim_real_net != "target" and self.base != "mtt":
            raise ValueError(f"mim_real_net {self.mim_real_net!r} is for base mtt only (base "
                             f"{self.base!r} has one network for both sides; allowed: 'target')")
        return self

    @model_validator(mode="after")
    def _blocks_exist(self) -> Config:
        if self.mim_blocks is not None:
            bad = [b for b in self.mim_blocks if not 1 <= b <= self.model.depth]
            if bad or not self.mim_blocks:
                raise ValueError(
                    f"mim_blocks {self.mim_blocks} must be a non-empty list of blocks in "
                    f"1..{self.model.depth} (model.depth)"
                )
        return self

    @property
    def blocks(self) -> list[int]:
        """0-based indices of the blocks the MIM term reads."""
        if self.mim_blocks is None:
            return list(range(self.model.depth))
        return sorted({b - 1 for b in self.mim_blocks})

    @classmethod
    def from_saved(cls, tree: dict) -> Config:
        """A config read back from a file a run wrote (results, a set's manifest). Fields added
        since take their defaults, except one whose default changed what a run computes: an
        evaluation saved before `net_seeds` existed gave every run the same network seeds."""
        tree = {**tree, "eval": {"net_seeds": "shared", **tree.get("eval", {})}}
        return cls.model_validate(tree)

    def digest(self) -> str:
        """16 hex digits that change with any setting: tells a run of this config from a run of
        another (folder names, a sweep's resume, what may overwrite what)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = ["Config", "EvalConfig", "ModelConfig", "DATASETS"]
