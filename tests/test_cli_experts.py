"""`mim4dd distill --set base=mtt` needs `mim4dd experts` first, and says so."""

import json

from typer.testing import CliRunner

from mim4dd.cli import app

MTT = ["--set", "base=mtt", "--set", "num_experts=2", "--set", "expert_train_epochs=2",
       "--set", "max_start_epoch=1", "--set", "expert_epochs=1", "--set", "model.width=8"]


def test_mtt_needs_the_experts_command_then_distills(tmp_path):
    runner = CliRunner()
    buffer = ["--set", f"expert_dir={tmp_path / 'experts'}"]
    distill = ["distill", "--dataset", "digits", "--ipc", "1", "--iterations", "2",
               "--batch-real", "8", "--set", "syn_steps=2", "--set", "lr_img=100",
               "--eval-epochs", "1", "--eval-nets", "1", "--out", str(tmp_path / "set"),
               *MTT, *buffer]
    missing = runner.invoke(app, distill)
    assert missing.exit_code == 2 and "mim4dd experts" in missing.output

    trained = runner.invoke(app, ["experts", "--dataset", "digits", *MTT, *buffer])
    assert trained.exit_code == 0, trained.output
    assert "2 trajectories x 3 checkpoints" in trained.stdout  # the result, on stdout
    # Not a terminal: a line per 10 % of each expert's epochs (here every epoch), on stderr.
    epochs = [line.split("  loss ")[0] for line in trained.stderr.splitlines()
              if line.startswith("expert ") and "  loss " in line]
    assert epochs == [f"expert {i}/2: epoch {e}/2" for i in (1, 2) for e in (1, 2)]
    assert "epoch" not in trained.stdout
    again = runner.invoke(app, ["experts", "--dataset", "digits", *MTT, *buffer])
    assert "expert 2/2: epoch 2/2  trained before" in again.stderr

    done = runner.invoke(app, distill)
    assert done.exit_code == 0, done.output
    results = json.loads((tmp_path / "set" / "results.json").read_text())
    assert results["evaluation"]["lr"] != 0.01  # evaluated with the learned step size
