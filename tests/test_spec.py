"""Sweep files: every invalid spec is refused before launch with the field at fault named, and
valid ones expand into the expected trials."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mim4dd.settings import set_dotted
from orchestrator.spec import SpecError, load_spec, parse_spec, trial_table

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def write(tmp_path: Path, spec: dict | str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


def spec_with(**fields) -> dict:
    """A small valid spec, with some fields replaced (None drops a field)."""
    spec = {"name": "t", "base": {"iterations": 2}, "grid": {"lam": [0, 0.8], "seed": [0, 1]}}
    spec.update(fields)
    return {key: value for key, value in spec.items() if value is not None}


def problems_of(tmp_path: Path, spec: dict | str) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, spec))
    return str(info.value)


# --- the invalid-spec matrix: (case, spec, texts the error must contain) -----------------------

DATASETS = "allowed: MNIST, FashionMNIST, SVHN, CIFAR10, CIFAR100"
INVALID = [
    ("unknown top-level field", spec_with(nmae="x"),
     ["nmae: unknown sweep field 'nmae'", "allowed: name, experiment, description, engine, grid"]),
    ("engine field at top level", spec_with(iterations=5),
     ["iterations: unknown sweep field 'iterations'; engine settings go under engine:"]),
    ("missing name and grid", spec_with(name=None, grid=None),
     ["name: Field required", "grid: Field required"]),
    ("bad sweep name", spec_with(name="my sweep"),
     ["name: String should match pattern", "(got 'my sweep')"]),
    ("unknown grid path", spec_with(grid={"lamda": [0.8]}),
     ["grid.lamda: unknown engine field 'lamda'; did you mean 'lam'?",
      "(allowed: dataset, data_root, val_fraction, split_seed, ipc,", "model, eval)"]),
    ("unknown nested base path", spec_with(base={"eval": {"epoch": 3}}),
     ["base.eval.epoch: unknown engine field 'epoch'", "(allowed: num_nets, epochs, lr,"]),
    ("unknown dotted base path", spec_with(base={"model.widht": 3}),
     ["base.model.widht: unknown engine field 'widht'",
      "(allowed: width, depth, norm, pooling)"]),
    ("sub-field of a setting", spec_with(grid={"lam.x": [1]}),
     ["grid.lam.x: 'lam' is a single setting, it has no field 'x'"]),
    ("unknown include path", spec_with(include=[{"ipc": 1}, {"ipcs": 1}]),
     ["include[1].ipcs: unknown engine field 'ipcs'; did you mean 'ipc'?", "(allowed: dataset,"]),
    ("unknown exclude path", spec_with(exclude=[{"sed": 0}]),
     ["exclude[0].sed: unknown engine field 'sed'", "(allowed: dataset,"]),
    ("exclude names no grid axis", spec_with(exclude=[{"ipc": 1}]),
     ["exclude[0].ipc: 'ipc' is not a grid axis (allowed: lam, seed)"]),
    ("empty exclude row", spec_with(exclude=[{}]),
     ["exclude[0]: an empty row would drop every grid point"]),
    ("wrong type in grid", spec_with(grid={"ipc": [1, "ten"]}),
     ["grid.ipc[1]: Input should be a valid integer", "(got 'ten')"]),
    ("wrong type in nested base", spec_with(base={"eval": {"epochs": "many"}}),
     ["base.eval.epochs: Input should be a valid integer", "(got 'many')"]),
    ("wrong type in a list value", spec_with(grid={"lr_milestones": [[10, "x"]]}),
     ["grid.lr_milestones[0][1]: Input should be a valid integer"]),
    ("empty axis", spec_with(grid={"lam": [0.8], "seed": []}), ["grid.seed: axis has no values"]),
    ("axis not a list", spec_with(grid={"lam": 0.8}),
     ["grid.lam: an axis is a list of values, e.g. [0.8]"]),
    ("nested grid", spec_with(grid={"eval": {"epochs": [1, 2]}}),
     ["grid.eval: grid axes are dotted paths with a list, e.g. 'eval.epochs: [50]'"]),
    ("unknown dataset", spec_with(grid={"dataset": ["MNIST", "ImageNet"]}),
     ["grid.dataset[1]: unknown dataset 'ImageNet'; " + DATASETS]),
    ("ipc zero", spec_with(grid={"ipc": [0, 10]}),
     ["grid.ipc[0]: Input should be greater than 0", "(got 0)"]),
    ("negative lam", spec_with(grid={"lam": [0.8, -0.5]}),
     ["grid.lam[1]: Input should be greater than or equal to 0", "(got -0.5)"]),
    ("negative lam in include", spec_with(include=[{"lam": -1}]),
     ["include[0].lam: Input should be greater than or equal to 0"]),
    ("unknown base method", spec_with(base={"base": "kip"}),
     ["base.base: 'kip' is not allowed (allowed: 'dm', 'dc', 'mtt' or 'cafe')"]),
    ("duplicate grid values", spec_with(grid={"dataset": ["CIFAR10", "cifar10"]}),
     ["grid: duplicate trial dataset=CIFAR10"]),
    ("include repeats a grid point", spec_with(include=[{"seed": 1, "lam": 0.80}]),
     ["include[0]: duplicate trial lam=0.8,seed=1"]),
    ("include repeats base", spec_with(grid={}, include=[{"lam": 0.8}]),
     ["include[0]: duplicate trial lam=0.8 (same engine config as (base))"]),
    ("setting given twice", spec_with(base={"eval.epochs": 2, "eval": {"epochs": 3}}),
     ["base.eval.epochs: the same setting is given twice"]),
    ("cross-field check", spec_with(base={"model.depth": 2}, grid={"mim_blocks": [[1], [3]]}),
     ["grid: trial mim_blocks=[3]: mim_blocks [3] must be a non-empty list of blocks in 1..2"]),
    ("cuda without a gpu", spec_with(base={"device": "cuda"}),
     ["resources.gpu: trials ask for device cuda but resources.gpu is 0"]),
    ("a device by number", spec_with(base={"device": "cuda:1"}, resources={"gpu": 1}),
     ["device: cuda:1 names a device by number, but Ray assigns each trial its GPUs"]),
    ("bad resources", spec_with(resources={"cpu": 0, "gpus": 1}),
     ["resources.cpu: Input should be greater than 0",
      "resources.gpus: unknown sweep field 'gpus' (allowed: cpu, gpu)"]),
    ("negative gpu", spec_with(resources={"gpu": -1}),
     ["resources.gpu: Input should be greater than or equal to 0"]),
    ("bad run settings", spec_with(max_concurrent=0, retries=-1, checkpoint_every=0),
     ["max_concurrent: Input should be greater than or equal to 1",
      "retries: Input should be greater than or equal to 0",
      "checkpoint_every: Input should be greater than or equal to 1"]),
    ("a name longer than a file name may be", spec_with(name="s" * 101),
     ["name: String should have at most 100 characters"]),
    ("infinite and absurd values", spec_with(grid={"lr_img": [float("inf")],
                                                   "iterations": [10**15, 1e15]}),
     ["grid.lr_img[0]: Input should be a finite number",
      "grid.iterations[0]: Input should be less than or equal to 10000000",
      "grid.iterations[1]: Input should be a valid integer"]),  # 1e15 is a float in YAML
    # A YAML boolean or a quoted number is not a number (`lam: [no, yes]` was a 0/1 grid).
    ("booleans and strings as numbers", spec_with(grid={"lam": [False, True], "ipc": ["1"]}),
     ["grid.lam[0]: Input should be a valid number", "grid.lam[1]: Input should be a valid number",
      "grid.ipc[0]: Input should be a valid integer"]),
    ("not a device", spec_with(base={"device": "banana"}),
     ["base.device: 'banana' is not a device (allowed: auto, cpu, cuda, cuda:N, mps)"]),
    ("every grid point excluded", spec_with(grid={"lam": [0]}, exclude=[{"lam": 0}]),
     ["grid: the sweep has no trials (every grid point is excluded)"]),
    ("a grid above the cap", spec_with(grid={"seed": list(range(200)), "lam": list(range(60))}),
     ["grid: 12000 trials is above max_trials (10000)"]),
]


@pytest.mark.parametrize("case, spec, expected", INVALID, ids=[case[0] for case in INVALID])
def test_invalid_spec_names_the_field(tmp_path, case, spec, expected):
    message = problems_of(tmp_path, spec)
    for text in expected:
        assert text in message, f"{case}: {text!r} not in\n{message}"


def test_every_problem_is_reported_at_once(tmp_path):
    spec = spec_with(
        nmae="x",
        base={"eval": {"epochs": 0}},
        grid={"lamda": [1], "ipc": [1, -1], "seed": []},
        exclude=[{"dataset": "MNIST"}],
    )
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, spec))
    problems = info.value.problems
    assert str(info.value).splitlines() == problems
    assert [p.split(":")[0] for p in problems] == [
        "nmae", "base.eval.epochs", "grid.lamda", "grid.ipc[1]", "grid.seed", "exclude[0].dataset"
    ]


def test_bad_value_repeated_over_the_grid_is_reported_once(tmp_path):
    message = problems_of(tmp_path, spec_with(base={"lam": -1}))
    assert message.count("base.lam:") == 1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: t\ngrid:\n  lam: [0, 0.8\n", "YAML error at line 4"),
        ("name: t\ngrid:\n  lam: [0]\n  lam: [1]\n", "YAML error at line 4, column 3: key 'lam'"),
        ("- name\n- grid\n", "a sweep file is a mapping of fields (name, grid, ...), not a list"),
        ("", "the sweep file is empty"),
    ],
    ids=["syntax", "duplicate key", "not a mapping", "empty"],
)
def test_unreadable_yaml(tmp_path, text, expected):
    message = problems_of(tmp_path, text)
    assert message.startswith(str(tmp_path / "sweep.yaml"))
    assert expected in message


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml: sweep file not found"):
        load_spec(tmp_path / "nope.yaml")


# --- valid specs -------------------------------------------------------------------------------


def test_grid_expands_in_order_with_canonical_keys(tmp_path):
    spec = load_spec(write(tmp_path, spec_with(grid={"lam": [0, 0.80], "seed": [1, 0]})))
    trials = spec.trials()
    assert [t.key for t in trials] == ["lam=0,seed=1", "lam=0,seed=0", "lam=0.8,seed=1",
                                       "lam=0.8,seed=0"]
    assert trials[2].overrides == {"lam": 0.8, "seed": 1}
    assert trials[2].config.lam == 0.8 and trials[2].config.seed == 1
    assert all(t.config.iterations == 2 for t in trials)
    assert spec.experiment_name == "mim4dd"


def test_keys_sort_axes_and_normalise_values(tmp_path):
    spec = load_spec(write(tmp_path, spec_with(grid={"seed": [0], "dataset": ["cifar10"],
                                                    "eval.epochs": [20]})))
    assert [t.key for t in spec.trials()] == ["dataset=CIFAR10,eval.epochs=20,seed=0"]


def test_include_adds_and_exclude_removes(tmp_path):
    spec = load_spec(write(tmp_path, spec_with(
        grid={"dataset": ["MNIST", "CIFAR10"], "lam": [0, 0.8]},
        exclude=[{"dataset": "cifar10", "lam": 0.0}],
        include=[{"dataset": "CIFAR100", "ipc": 50, "model": {"width": 64}}],
    )))
    keys = [t.key for t in spec.trials()]
    assert keys == ["dataset=MNIST,lam=0", "dataset=MNIST,lam=0.8", "dataset=CIFAR10,lam=0.8",
                    "dataset=CIFAR100,ipc=50,model.width=64"]
    extra = spec.trials()[-1]
    assert extra.overrides == {"dataset": "CIFAR100", "ipc": 50, "model.width": 64}
    assert extra.config.iterations == 2 and extra.config.lam == 0.8  # base, then engine default


def test_exclude_can_skip_an_invalid_combination(tmp_path):
    spec = load_spec(write(tmp_path, spec_with(
        grid={"model.depth": [2, 4], "mim_blocks": [[1], [4]]},
        exclude=[{"model.depth": 2, "mim_blocks": [4]}],
    )))
    assert len(spec.trials()) == 3


def test_dotted_and_nested_base_are_the_same(tmp_path):
    dotted = spec_with(base={"eval.epochs": 20, "model.width": 32, "iterations": 2})
    nested = spec_with(base={"eval": {"epochs": 20}, "model": {"width": 32}, "iterations": 2})
    a = load_spec(write(tmp_path, dotted, "a.yaml")).trials()
    b = load_spec(write(tmp_path, nested, "b.yaml")).trials()
    assert [t.config for t in a] == [t.config for t in b]
    assert a[0].config.eval.epochs == 20 and a[0].config.eval.num_nets == 5
    assert a[0].config.model.width == 32 and a[0].config.model.depth == 3
    assert a[0].digest == b[0].digest != a[1].digest


def test_cli_overrides_win(tmp_path):
    path = write(tmp_path, spec_with(ray_address="auto", tracking_uri="sqlite:///x.db"))
    assert load_spec(path).ray_address == "auto"
    spec = load_spec(path, address="ray://head:10001", tracking_uri="http://mlflow:5000")
    assert spec.ray_address == "ray://head:10001"
    assert spec.tracking_uri == "http://mlflow:5000"
    assert load_spec(write(tmp_path, spec_with(), "b.yaml"), address="auto").ray_address == "auto"


def test_trial_table(tmp_path):
    spec = load_spec(write(tmp_path, spec_with(resources={"cpu": 2, "gpu": 0.25},
                                               include=[{"ipc": 50}])))
    rows = trial_table(spec)
    assert len(rows) == 5
    assert rows[0] == {"key": "lam=0,seed=0", "lam": 0.0, "seed": 0, "ipc": 10,
                       "cpu": 2.0, "gpu": 0.25}
    assert rows[-1] == {"key": "ipc=50", "lam": 0.8, "seed": 0, "ipc": 50, "cpu": 2.0, "gpu": 0.25}


def test_parse_spec_from_a_dict():
    assert len(parse_spec(spec_with()).trials()) == 4
    with pytest.raises(SpecError, match="grid.ipc\\[0\\]"):
        parse_spec(spec_with(grid={"ipc": [0]}))


def test_set_dotted():
    tree: dict = {"eval": {"lr": 0.1}}
    set_dotted(tree, "eval.epochs", 3)
    set_dotted(tree, "lam", 0.5)
    assert tree == {"eval": {"lr": 0.1, "epochs": 3}, "lam": 0.5}
    with pytest.raises(ValueError, match="'lam' holds a value"):
        set_dotted(tree, "lam.x", 1)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_shipped_sweeps_load_and_expand(path):
    spec = load_spec(path)
    trials = spec.trials()
    assert spec.name == path.stem
    assert trials and len({t.key for t in trials}) == len(trials)
    assert len(trial_table(spec)) == len(trials)


def test_shipped_sweeps_are_the_documented_ones():
    assert {p.name for p in SWEEPS} >= {"quickstart.yaml", "lambda_ablation.yaml",
                                        "main_table.yaml", "cross_arch.yaml"}
    assert len(load_spec(REPO / "sweeps" / "quickstart.yaml").trials()) == 4
    assert len(load_spec(REPO / "sweeps" / "lambda_ablation.yaml").trials()) == 45
    # 6 MTT presets x lambda 0 and 0.8 x 5 seeds
    assert len(load_spec(REPO / "sweeps" / "main_table.yaml").trials()) == 60
    cross = load_spec(REPO / "sweeps" / "cross_arch.yaml").trials()
    assert len(cross) == 4 and cross[0].config.eval.models == [
        "convnet", "mlp", "lenet", "alexnet", "vgg11", "resnet18"]


def test_engine_section_and_the_old_base_key(tmp_path):
    new = load_spec(write(tmp_path, {"name": "t", "engine": {"iterations": 2, "base": "dc"},
                                     "grid": {"lam": [0, 0.8]}}, "new.yaml"))
    assert not new.notices and [t.config.base for t in new.trials()] == ["dc", "dc"]
    old = load_spec(write(tmp_path, spec_with(base={"iterations": 2, "base": "dc"}), "old.yaml"))
    assert [t.config for t in old.trials()][:1] == [t.config for t in new.trials()][:1]
    [notice] = old.notices
    assert "now called engine:" in notice and "still read" in notice
    # Errors name the section as the file spells it.
    assert "engine.lam: Input should be greater than or equal to 0" in problems_of(
        tmp_path, {"name": "t", "engine": {"lam": -1}, "grid": {}})
    both = problems_of(tmp_path, spec_with(engine={"iterations": 2}))
    assert "the engine section is given twice" in both


def test_trials_are_expanded_once_and_carry_their_digest(tmp_path, monkeypatch):
    from orchestrator import spec as spec_module

    calls = []
    real = spec_module.expand
    monkeypatch.setattr(spec_module, "expand", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = load_spec(write(tmp_path, spec_with()))
    first, again = spec.trials(), spec.trials()
    trial_table(spec)
    assert calls == [1] and first is again
    assert len({t.digest for t in first}) == 4 and all(len(t.digest) == 16 for t in first)


def test_a_huge_grid_is_refused_before_it_is_expanded(tmp_path):
    axes = {f"eval.{f}": list(range(1, 101)) for f in ("epochs", "num_nets", "batch_size")}
    axes["seed"] = list(range(1000))  # 10^9 trials: expanding them would never finish
    message = problems_of(tmp_path, spec_with(grid=axes))
    assert "1000000000 trials is above max_trials" in message
    small = write(tmp_path, spec_with(grid={"seed": list(range(3))}), "small.yaml")
    assert len(load_spec(small).trials()) == 3
    with pytest.raises(SpecError, match=r"3 trials is above max_trials \(2\)"):
        load_spec(small, max_trials=2)  # the CLI's --max-trials


def test_an_alias_bomb_is_refused_quickly(tmp_path):
    # 9^9 milestones through 81 aliases: validating them would take minutes and gigabytes.
    lines = ["name: bomb", "grid: {lam: [0]}", "anchors:", "  - &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for level in range(1, 10):
        lines.append(f"  - &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    lines.append("engine: {lr_milestones: *a9}")
    message = problems_of(tmp_path, "\n".join(lines) + "\n")
    assert "expands to" in message and "aliases" in message


def test_variants_run_at_every_grid_point_one_factor_at_a_time(tmp_path):
    spec = load_spec(write(tmp_path, spec_with(
        grid={"seed": [0, 1]},
        variants=[{}, {"tau": 0.5}, {"mim_grid": 1, "model": {"width": 16}}],
    )))
    keys = [t.key for t in spec.trials()]
    assert keys == ["seed=0", "seed=0,tau=0.5", "mim_grid=1,model.width=16,seed=0",
                    "seed=1", "seed=1,tau=0.5", "mim_grid=1,model.width=16,seed=1"]
    trial = spec.trials()[2]
    assert trial.overrides == {"mim_grid": 1, "model.width": 16, "seed": 0}
    assert trial.config.tau == 0.1 and trial.config.iterations == 2


def test_a_variant_may_not_set_a_grid_axis_nor_repeat_the_grid_point(tmp_path):
    text = problems_of(tmp_path, spec_with(
        grid={"seed": [0], "lam": [0.8]}, variants=[{}, {"lam": 0.4}, {"tau": 0.1}]))
    assert "variants[1].lam: 'lam' is also the grid axis 'lam'" in text
    assert "variants[2]: duplicate trial lam=0.8,seed=0,tau=0.1 (same engine config as " \
           "lam=0.8,seed=0)" in text
