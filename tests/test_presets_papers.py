"""Presets against the papers: each published hyper-parameter typed in from its source (cited
per row) and compared with the preset as a run resolves it (`Config(base=..., preset=...)`:
mim4dd/presets.yaml over the config defaults).

Where the project departs from a paper on purpose, the row gives the published value, the
project's documented value and where the reason is written down, and asserts the project's.
"""

from dataclasses import dataclass

import pytest

from mim4dd.config import Config
from mim4dd.objectives.gradient import loops_for_ipc
from mim4dd.presets import preset_names

MTT_PAPER = ("Cazenavette et al., 'Dataset Distillation by Matching Training Trajectories', "
             "CVPR 2022, appendix table of hyper-parameters")
MTT_CODE = "the MTT authors' code (github.com/GeorgeCazenavette/mtt-distillation)"
DC_PAPER = "Zhao, Mopuri, Bilen, 'Dataset Condensation with Gradient Matching', ICLR 2021"
DSA_PAPER = ("Zhao & Bilen, 'Dataset Condensation with Differentiable Siamese Augmentation', "
             "ICML 2021")
DC_CODE = "the DC/DSA/DM authors' code (github.com/VICO-UoE/DatasetCondensation, main.py)"
DM_PAPER = "Zhao & Bilen, 'Dataset Condensation with Distribution Matching', WACV 2023"
DM_CODE = "the DM authors' code (github.com/VICO-UoE/DatasetCondensation, main_DM.py)"
MIM4DD_PROTOCOL = ("this project's protocol, the MIM4DD appendix's: images' SGD lr 0.1, momentum "
                   "0.5, halved at 1800 and 2800 of 5000 updates (docs/method.md 'Objective' and "
                   "'Base: CAFE' > 'Schedule'; presets.yaml 'dm:' comment)")

# --- MTT: the per-setting table ------------------------------------------------------------------

MTT_COLUMNS = ("syn_steps", "expert_epochs", "max_start_epoch", "batch_syn", "lr_img", "lr_lr",
               "lr_teacher", "zca")
MTT_TABLE = {  # preset: (N, M, T+, synthetic batch (None: all), lr pixels, lr step size,
    #                     initial step size alpha_0, ZCA); each row: MTT_PAPER, that column
    "cifar10-ipc1": (50, 2, 2, None, 100, 1e-7, 0.01, True),
    "cifar10-ipc10": (30, 2, 20, None, 100, 1e-5, 0.001, True),
    "cifar10-ipc50": (30, 2, 40, None, 1000, 1e-5, 0.001, False),
    "cifar100-ipc1": (20, 3, 20, None, 1000, 1e-5, 0.01, True),
    "cifar100-ipc10": (20, 2, 20, None, 1000, 1e-5, 0.01, False),
    "cifar100-ipc50": (80, 2, 40, 125, 1000, 1e-5, 0.01, True),
}


def resolved(base: str, preset: str) -> Config:
    return Config(base=base, preset=preset)


def test_every_mtt_preset_has_a_published_row():
    assert preset_names("mtt") == sorted(MTT_TABLE)


@pytest.mark.parametrize("preset", MTT_TABLE)
def test_mtt_preset_is_the_published_setting(preset):
    """N, M, T+, batch, the three learning rates and ZCA: MTT_PAPER, the row of `preset`."""
    config = resolved("mtt", preset)
    got = {column: getattr(config, column) for column in MTT_COLUMNS}
    assert got == dict(zip(MTT_COLUMNS, MTT_TABLE[preset], strict=True)), f"{MTT_PAPER}: {preset}"


# --- every other published value, one row each --------------------------------------------------


@dataclass(frozen=True)
class Published:
    base: str
    field: str
    value: object  # as published
    source: str
    documented: object = None  # the project's value, where it departs from the paper on purpose
    reason: str = ""  # where the project says why

    @property
    def expected(self):
        return self.value if self.reason == "" else self.documented

    @property
    def id(self) -> str:
        return f"{self.base}-{self.field}"


ROWS = [
    # MTT, every setting
    Published("mtt", "iterations", 5000, f"{MTT_CODE}, distill.py --Iteration default"),
    Published("mtt", "lr_milestones", [], f"{MTT_CODE}, distill.py: constant image lr"),
    Published("mtt", "momentum_img", 0.5, f"{MTT_CODE}, distill.py: SGD(momentum=0.5)"),
    Published("mtt", "expert_train_epochs", 50,
              f"{MTT_CODE}, readme: 'We used 50 epochs with the default learning rate for all "
              "of our experts'"),
    Published("mtt", "expert_lr", 0.01, f"{MTT_CODE}, buffer.py --lr_teacher default"),
    Published("mtt", "expert_batch", 256, f"{MTT_CODE}, buffer.py --batch_train default"),
    Published("mtt", "num_experts", 100, f"{MTT_CODE}, readme: buffer.py --num_experts=100"),
    Published("mtt", "dsa_strategy", "color_crop_cutout_flip_scale_rotate",
              f"{MTT_CODE}, distill.py --dsa_strategy default"),
    # DC / DSA (base dc; the default dsa_strategy makes it DSA)
    Published("dc", "lr_img", 0.1, f"{DC_PAPER}, implementation details; {DC_CODE} --lr_img"),
    Published("dc", "lr_net", 0.01, f"{DC_PAPER}, implementation details; {DC_CODE} --lr_net"),
    Published("dc", "momentum_img", 0.5, f"{DC_CODE}: optimizer_img SGD(momentum=0.5)"),
    Published("dc", "lr_milestones", [], f"{DC_CODE}: constant image lr"),
    Published("dc", "batch_real", 256, f"{DC_CODE} --batch_real (per class)"),
    Published("dc", "batch_train", 256, f"{DC_CODE} --batch_train"),
    Published("dc", "dis_metric", "ours", f"{DC_CODE} --dis_metric"),
    Published("dc", "dsa_strategy", "color_crop_cutout_flip_scale_rotate",
              f"{DSA_PAPER}, the strategy of its results"),
    # DM
    Published("dm", "batch_real", 256, f"{DM_PAPER}; {DM_CODE} --batch_real (per class)"),
    Published("dm", "momentum_img", 0.5, f"{DM_CODE}: optimizer_img SGD(momentum=0.5)"),
    Published("dm", "dsa_strategy", "color_crop_cutout_flip_scale_rotate",
              f"{DM_PAPER}; {DM_CODE} --dsa_strategy"),
    Published("dm", "lr_img", 1.0, f"{DM_PAPER}; {DM_CODE} --lr_img", 0.1, MIM4DD_PROTOCOL),
    Published("dm", "iterations", 20000, f"{DM_PAPER}; {DM_CODE} --Iteration", 5000,
              MIM4DD_PROTOCOL),
    Published("dm", "lr_milestones", [], f"{DM_CODE}: constant image lr", [1800, 2800],
              MIM4DD_PROTOCOL),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_presets_hold_the_published_value(row):
    """Every preset of the row's base resolves the field to the published value, or to the
    project's documented one (the row says where it is documented)."""
    if row.reason:
        assert row.documented != row.value, "a documented departure must depart"
    for preset in preset_names(row.base):
        assert getattr(resolved(row.base, preset), row.field) == row.expected, (
            f"{row.base} {preset}: {row.source}" + (f" -> {row.reason}" if row.reason else ""))


# --- DC / DSA: the loops and the iteration count per IPC ----------------------------------------

DC_LOOPS = {1: (1, 1), 10: (10, 50), 50: (50, 10)}  # (outer, inner) per IPC: DC_PAPER and DC_CODE
DC_OUTER_ITERATIONS = 1000  # K: DC_PAPER; DC_CODE --Iteration


@pytest.mark.parametrize("preset", preset_names("dc"))
def test_dc_preset_runs_the_published_loops_for_the_published_iterations(preset):
    """outer_loop / inner_loop per IPC as published; iterations = K x outer_loop, because one
    published outer iteration is outer_loop image updates, each a Distiller iteration here
    (docs/method.md 'Base: gradient matching' > 'Outer/inner loops'; presets.yaml 'dc:')."""
    config = resolved("dc", preset)
    outer, inner = DC_LOOPS[config.ipc]
    assert (config.outer_loop, config.inner_loop) == (None, None)  # so loops_for_ipc decides
    assert loops_for_ipc(config.ipc) == (outer, inner), f"{DC_PAPER}: IPC {config.ipc}"
    assert config.iterations == DC_OUTER_ITERATIONS * outer
