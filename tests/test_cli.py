"""`mim4dd distill` then `mim4dd evaluate`, as a user runs them."""

import json

from conftest import tiny_config
from typer.testing import CliRunner

from mim4dd.cli import app
from mim4dd.experiment import run_experiment
from mim4dd.synset import SyntheticSet

TINY = ["--dataset", "digits", "--ipc", "1", "--iterations", "3", "--batch-real", "8",
        "--set", "model.width=8", "--eval-epochs", "2", "--eval-nets", "2"]


def test_distill_then_evaluate(tmp_path):
    runner = CliRunner()
    out = tmp_path / "set"
    result = runner.invoke(app, ["distill", *TINY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {"synset.safetensors", "manifest.json", "grid.png", "results.json"} <= {
        p.name for p in out.iterdir()
    }
    results = json.loads((out / "results.json").read_text())
    assert len(results["evaluation"]["test_accuracies"]) == 2
    assert "test accuracy:" in result.stdout and "test accuracy:" not in result.stderr
    assert "distill digits" in result.stderr  # progress goes to stderr
    # Not a terminal: a plain progress line per step here (3 steps, at most 20 lines a run).
    assert [line.split()[1] for line in result.stderr.splitlines()
            if line.startswith("iteration ")] == ["1/3", "2/3", "3/3"]
    assert results["config"]["model"]["width"] == 8
    assert SyntheticSet.load(out).images.shape == (10, 1, 8, 8)

    again = runner.invoke(app, ["distill", *TINY, "--out", str(out)])
    assert again.exit_code == 0 and "nothing to do" in again.output
    # Another config (one more iteration) does not silently replace the finished run.
    other = runner.invoke(app, ["distill", *TINY, "--iterations", "4", "--out", str(out)])
    assert other.exit_code == 2 and "holds a finished run of another config" in other.output
    assert "--force" in other.output and json.loads((out / "results.json").read_text()) == results

    evaluated = runner.invoke(app, ["evaluate", str(out), "--epochs", "2", "--num-nets", "1"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((out / "evaluation.json").read_text())
    assert report["eval"]["num_nets"] == 1 and len(report["evaluation"]["test_accuracies"]) == 1


def test_default_folders_differ_by_any_setting():
    from mim4dd.cli import default_out_dir
    from mim4dd.config import Config

    base = Config(dataset="digits", ipc=1, lam=0.8, seed=0)
    folders = {default_out_dir(base), default_out_dir(base.model_copy(update={"iterations": 7})),
               default_out_dir(Config(dataset="digits", ipc=1, lam=0.8, seed=0,
                                      model={"width": 8}))}
    assert len(folders) == 3  # width or iterations used to share dataset-ipc-base-lam-seed
    assert default_out_dir(base) == default_out_dir(Config(dataset="digits", ipc=1, seed=0))


def test_evaluate_a_saved_set_on_several_architectures(tmp_path, digits):
    out = tmp_path / "set"
    run_experiment(tiny_config(iterations=1), digits, evaluate=False).save(out)
    runner = CliRunner()
    args = ["evaluate", str(out), "--models", "convnet, mlp", "--epochs", "1", "--num-nets", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "convnet" in line or "mlp" in line]
    assert len(rows) >= 2 and "architecture" in result.stdout  # the table, on stdout
    assert "mlp network 1: test" in result.stderr and "network 1" not in result.stdout
    report = json.loads((out / "evaluation.json").read_text())
    assert report["eval"]["models"] == ["convnet", "mlp"]
    assert list(report["evaluation"]["architectures"]) == ["convnet", "mlp"]

    bad = runner.invoke(app, ["evaluate", str(out), "--models", "convnet,vgg16"])
    assert bad.exit_code == 2 and "allowed: convnet" in bad.output
    assert "Traceback" not in bad.output
    unfit = runner.invoke(app, ["evaluate", str(out), "--models", "lenet"])
    assert unfit.exit_code == 2 and "lenet: cannot take 1x8x8 images" in unfit.output


def test_piped_evaluate_prints_a_line_every_tenth_of_each_networks_epochs(tmp_path, digits):
    out = tmp_path / "set"
    run_experiment(tiny_config(iterations=1), digits, evaluate=False).save(out)
    result = CliRunner().invoke(app, ["evaluate", str(out), "--epochs", "20", "--num-nets", "2"])
    assert result.exit_code == 0, result.output
    # CliRunner's stderr is not a terminal, as in `mim4dd evaluate ... 2> log`.
    lines = [line.split("  loss ") for line in result.stderr.splitlines() if " epoch " in line]
    assert [head for head, _ in lines] == [
        f"convnet network {net}: epoch {epoch}/20" for net in (1, 2) for epoch in range(2, 21, 2)]
    assert all(float(loss) > 0 for _, loss in lines)
    assert " epoch " not in result.stdout and "test accuracy:" in result.stdout


def test_bad_input_is_a_clear_error(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["distill", "--dataset", "imagenet", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "dataset" in result.output and "allowed: MNIST" in result.output
    result = runner.invoke(app, ["distill", "--set", "lamda=0.5", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "lamda" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "manifest.json" in result.output


def test_careless_input_is_a_one_line_error_not_a_traceback(tmp_path):
    runner = CliRunner()
    cases = [
        (["--set", "ipc="], "--set expects KEY=VALUE with both given"),
        (["--config", str(tmp_path / "missing.yaml")], "cannot be read"),
        (["--set", "model=5"], "model: Input should be a valid dictionary"),
        (["--set", "device=banana"], "'banana' is not a device"),
        (["--set", "lr_img=.inf"], "lr_img: Input should be a finite number"),
        (["--checkpoint-every", "-1"], "checkpoint-every"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, ["distill", *args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output, (args,
                                                                                result.output)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_both_clis_print_their_version():
    from mim4dd import __version__
    from orchestrator.cli import app as sweep_app

    for cli_app in (app, sweep_app):
        result = CliRunner().invoke(cli_app, ["--version"])
        assert result.exit_code == 0 and result.output == f"mim4dd {__version__}\n"
    assert __version__ != "unknown"  # the tests run an installed package


def test_one_name_per_knob_and_defaults_in_help(tmp_path):
    runner = CliRunner()
    for command in ("distill", "evaluate"):
        shown = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "--eval-nets" in shown and "--num-nets" in shown, command  # new name, old alias
    shown = runner.invoke(app, ["distill", "--help"], env={"COLUMNS": "200"}).output
    assert "[default: (5000)]" in shown and "[default: (FashionMNIST)]" in shown
