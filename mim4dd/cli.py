"""`mim4dd` command line: distill one synthetic set, or evaluate a saved one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mim4dd.atomic import write_atomic
from mim4dd.config import Config, EvalConfig
from mim4dd.datasets import DatasetError
from mim4dd.distill import Distiller, save_state
from mim4dd.evaluate import EvalResult, NetEpoch, NetResult
from mim4dd.experiment import (
    RESULTS_FILE, STATE_FILE, ExperimentCallback, evaluate_synset, finished_config, load_data,
    run_experiment,
)
from mim4dd.loglines import LogLines
from mim4dd.objectives import DivergenceError
from mim4dd.settings import get_dotted, set_dotted, validation_problems
from mim4dd.synset import SyntheticSet, SyntheticSetError
from mim4dd.version import VersionOption

app = typer.Typer(help="MIM4DD dataset distillation engine.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
# Results on stdout (`mim4dd distill ... | tee`), progress and messages on stderr; both keep
# paths and messages on one line, so they stay greppable.
results = Console(soft_wrap=True)
console = Console(stderr=True, soft_wrap=True)


@app.callback()
def main(version: VersionOption = False) -> None:
    """MIM4DD dataset distillation engine."""


_DEFAULTS = Config().model_dump(mode="json")  # built once, for --help


def _default(path: str) -> str:
    """The engine's default for a dotted Config field, shown in --help."""
    return str(get_dotted(_DEFAULTS, path))


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(2)


def _parse_assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise _fail(f"--set expects KEY=VALUE with both given, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)  # YAML typing: 0.8 -> float, [1,2] -> list
    except yaml.YAMLError as exc:
        raise _fail(f"--set {text!r}: the value is not valid YAML ({exc})") from None


def _build_config(config_file: Path | None, settings: dict[str, Any]) -> Config:
    tree: dict[str, Any] = {}
    if config_file is not None:
        try:
            tree = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise _fail(f"--config {config_file}: cannot be read ({exc})") from None
        if not isinstance(tree, dict):
            raise _fail(f"--config {config_file}: a config file is a mapping of fields")
    try:
        for dotted, value in settings.items():
            if value is not None:
                set_dotted(tree, dotted, value)
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = "\n".join(f"  {line}" for line in validation_problems(exc))
        raise _fail(f"invalid configuration:\n{problems}") from None
    except ValueError as exc:  # a dotted path through a plain value
        raise _fail(str(exc)) from None


def _eval_plan(config: EvalConfig) -> str:
    return (f"{config.num_nets} networks x {config.epochs} epochs of "
            f"{', '.join(config.models)}")


# In a log (stderr not a terminal): a line every 5 % of a distillation, every 10 % of each
# evaluation network's and each expert's epochs.
step_lines, epoch_lines = LogLines(console, 20), LogLines(console, 10)


def _print_epoch(epoch: NetEpoch) -> None:
    epoch_lines(epoch.epoch, epoch.epochs, f"{epoch.architecture} network {epoch.index + 1}: "
                f"epoch {epoch.epoch}/{epoch.epochs}  loss {epoch.loss:.4g}")


def _print_network(network: NetResult) -> None:
    """A progress line per finished evaluation network."""
    line = (f"{network.architecture} network {network.index + 1}: test "
            f"{100 * network.test_accuracy:.2f} %")
    if network.val_accuracy is not None:
        line += f"  (validation {100 * network.val_accuracy:.2f} %)"
    console.print(line, highlight=False)


def _evaluation_table(evaluation: EvalResult) -> Table:
    """One row per architecture: test mean ± std and validation mean over its networks (%)."""
    table = Table("architecture")
    for column in ("test acc %", "± std", "val acc %", "nets"):
        table.add_column(column, justify="right")
    for arch, result in evaluation.by_architecture.items():
        table.add_row(arch, f"{100 * result.mean:.2f}", f"{100 * result.std:.2f}",
                      f"{100 * result.val_mean:.2f}", str(len(result.test_accuracies)))
    return table


def default_out_dir(config: Config) -> Path:
    """Derived from the config, so re-running the same command finds (and resumes) its run, and
    a run differing in any other setting (width, iterations, lr) gets its own (the digest)."""
    name = f"{config.dataset}-ipc{config.ipc}-{config.base}-lam{config.lam:g}-seed{config.seed}"
    return Path("runs") / f"{name}-{config.digest()[:8]}"


class _ProgressCallback(ExperimentCallback):
    """A rich progress bar with the loss (in a log file: plain lines, `step_lines`), a
    resumable state file every N iterations, and lines for the evaluation."""

    def __init__(self, progress: Progress, task, state_path: Path, total: int):
        self.progress, self.task, self.state_path, self.total = progress, task, state_path, total

    def on_start(self, distiller: Distiller) -> None:
        if distiller.iteration:
            console.print(f"resuming from {self.state_path} at iteration {distiller.iteration}")
        self.progress.update(self.task, completed=distiller.iteration)

    def on_iteration(self, iteration: int, metrics: dict[str, float]) -> None:
        loss = f"loss {metrics['loss']:.4g} (base {metrics['loss_base']:.4g}"
        loss += f", mim {metrics['loss_mim']:.4g})" if "loss_mim" in metrics else ")"
        rate = f"{1 / max(metrics['seconds_per_iteration'], 1e-9):.2f} it/s"
        self.progress.update(self.task, completed=iteration, loss=loss, rate=rate)
        step_lines(iteration, self.total, f"iteration {iteration}/{self.total}  {loss}  {rate}")

    def on_checkpoint(self, iteration: int, state: dict) -> None:
        save_state(state, self.state_path)

    def on_evaluation_start(self, config: EvalConfig) -> None:
        self.progress.stop()
        console.print(f"evaluating: {_eval_plan(config)}")

    def on_network(self, network: NetResult) -> None:
        _print_network(network)

    def on_eval_epoch(self, epoch: NetEpoch) -> None:
        _print_epoch(epoch)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[loss]}"),
        console=console,
    )


@app.command()
def distill(
    config_file: Annotated[Optional[Path], typer.Option("--config", help="YAML with Config fields")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="MNIST, FashionMNIST, SVHN, CIFAR10, CIFAR100, digits, ImageFolder",
        show_default=_default("dataset"))] = None,
    ipc: Annotated[Optional[int], typer.Option(
        help="synthetic images per class", show_default=_default("ipc"))] = None,
    lam: Annotated[Optional[float], typer.Option(
        help="weight of the MIM term (0 = base method)", show_default=_default("lam"))] = None,
    iterations: Annotated[Optional[int], typer.Option(
        help="image updates", show_default=_default("iterations"))] = None,
    batch_real: Annotated[Optional[int], typer.Option(
        help="real images per class per step", show_default=_default("batch_real"))] = None,
    seed: Annotated[Optional[int], typer.Option(show_default=_default("seed"))] = None,
    data_root: Annotated[Optional[str], typer.Option(
        show_default="~/.cache/mim4dd/data")] = None,
    device: Annotated[Optional[str], typer.Option(
        help="auto, cpu, cuda, cuda:1, ...", show_default=_default("device"))] = None,
    eval_epochs: Annotated[Optional[int], typer.Option(
        "--eval-epochs", "--epochs", help="epochs per evaluation network",
        show_default=_default("eval.epochs"))] = None,
    eval_nets: Annotated[Optional[int], typer.Option(
        "--eval-nets", "--num-nets", help="networks trained in the evaluation",
        show_default=_default("eval.num_nets"))] = None,
    settings: Annotated[Optional[list[str]], typer.Option("--set", help="any Config field: --set model.width=64")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output folder (default: derived from the config)")] = None,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="evaluate the distilled set")] = True,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="iterations between resumable state saves (0: none)")] = 100,
    force: Annotated[bool, typer.Option(help="start over even if OUT holds a finished run")] = False,
) -> None:
    """Distill a synthetic set, evaluate it and write it with a results JSON."""
    values = {
        "dataset": dataset, "ipc": ipc, "lam": lam, "iterations": iterations,
        "batch_real": batch_real, "seed": seed, "data_root": data_root, "device": device,
        "eval.epochs": eval_epochs, "eval.num_nets": eval_nets,
    }
    values.update(_parse_assignment(s) for s in settings or [])
    config = _build_config(config_file, values)
    out = out or default_out_dir(config)
    state_path = out / STATE_FILE
    finished = None if force else finished_config(out)
    if finished is not None and finished.digest() == config.digest():
        console.print(f"{out} already holds this run; nothing to do (--force to redo).")
        return
    if finished is not None:
        raise _fail(f"{out} holds a finished run of another config (digest {finished.digest()}; "
                    f"this one is {config.digest()}): give another --out, or --force to "
                    "replace it")
    resume = state_path if state_path.exists() and not force else None
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _progress() as progress:
            task = progress.add_task(f"distill {config.dataset} ipc={config.ipc} λ={config.lam:g}",
                                     total=config.iterations, loss="", rate="")
            callback = _ProgressCallback(progress, task, state_path, config.iterations)
            result = run_experiment(config, callback=callback,
                                    evaluate=evaluate, state=resume,
                                    checkpoint_every=checkpoint_every)
    except (DatasetError, DivergenceError, ValueError) as exc:
        raise _fail(str(exc)) from None
    result.save(out)
    state_path.unlink(missing_ok=True)
    evaluation = result.evaluation
    results.print(f"wrote {out} (synset.safetensors, manifest.json, grid.png, {RESULTS_FILE})")
    if evaluation is not None and evaluation.per_architecture:
        results.print(_evaluation_table(evaluation))
    elif evaluation is not None:
        results.print(f"test accuracy: [bold]{evaluation}[/bold]  "
                      f"(validation {100 * evaluation.val_mean:.2f} %)")


@app.command("evaluate")
def evaluate_command(
    path: Annotated[Path, typer.Argument(help="a saved synthetic set folder")],
    epochs: Annotated[Optional[int], typer.Option(
        "--eval-epochs", "--epochs", help="epochs per network",
        show_default="the set's own protocol")] = None,
    num_nets: Annotated[Optional[int], typer.Option(
        "--eval-nets", "--num-nets", help="networks to train",
        show_default="the set's own protocol")] = None,
    seed: Annotated[Optional[int], typer.Option(help="first evaluation network's seed")] = None,
    models: Annotated[Optional[str], typer.Option(
        help="architectures, comma-separated: convnet, mlp, lenet, alexnet, vgg11, vgg11_bn, "
             "resnet18, resnet18_bn", show_default="the set's own protocol")] = None,
    data_root: Annotated[Optional[str], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    out: Annotated[Optional[Path], typer.Option(help="results JSON (default PATH/evaluation.json)")] = None,
) -> None:
    """Train fresh networks of each architecture on a saved set and test them on the real test
    split: a table per architecture on stdout, a line per finished network on stderr."""
    try:
        synset = SyntheticSet.load(path)
    except SyntheticSetError as exc:
        raise _fail(str(exc)) from None
    tree = synset.manifest["config"]
    overrides = {"epochs": epochs, "num_nets": num_nets, "seed": seed, "models": models}
    tree["eval"].update({k: v for k, v in overrides.items() if v is not None})
    tree.update({k: v for k, v in {"data_root": data_root, "device": device}.items() if v})
    try:
        config = Config.from_saved(tree)
    except ValidationError as exc:
        problems = "\n".join(f"  {line}" for line in validation_problems(exc))
        raise _fail(f"invalid evaluation settings:\n{problems}") from None
    try:
        console.print(f"evaluating {path}: {_eval_plan(config.eval)}")
        evaluation = evaluate_synset(synset, config, on_network=_print_network,
                                     on_epoch=_print_epoch)
    except (DatasetError, ValueError) as exc:
        raise _fail(str(exc)) from None
    out = out or path / "evaluation.json"
    text = json.dumps({"set": str(path), "eval": config.eval.model_dump(mode="json"),
                       "evaluation": evaluation.to_dict()}, indent=2) + "\n"
    write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    results.print(_evaluation_table(evaluation))
    results.print(f"test accuracy: [bold]{evaluation}[/bold]; wrote {out}")


@app.command("experts")
def experts_command(
    config_file: Annotated[
        Optional[Path], typer.Option("--config", help="YAML with Config fields")
    ] = None,
    dataset: Annotated[Optional[str], typer.Option(help="dataset the experts train on")] = None,
    split_seed: Annotated[
        Optional[int], typer.Option(help="seed of the validation hold-out the experts never "
                                         "see (each expert's own seed comes from its index)")
    ] = None,
    data_root: Annotated[Optional[str], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = None,
    num_experts: Annotated[
        Optional[int], typer.Option(help="default: the config's num_experts")
    ] = None,
    settings: Annotated[
        Optional[list[str]], typer.Option("--set", help="any Config field: --set model.width=64")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="buffer folder (default: expert_dir, else from the key)")
    ] = None,
) -> None:
    """Train (or finish) the expert-trajectory buffer that `--set base=mtt` distillation reads."""
    from mim4dd.experts import ExpertBufferError, expert_dir, train_experts

    values = {"dataset": dataset, "split_seed": split_seed, "data_root": data_root,
              "device": device}
    values.update(_parse_assignment(s) for s in settings or [])
    config = _build_config(config_file, values)
    count = num_experts or config.num_experts
    epochs = config.expert_train_epochs
    try:
        data = load_data(config)
        folder = out or expert_dir(config, data)
        with _progress() as progress:
            task = progress.add_task(f"experts {config.dataset} x{count}", total=count * epochs,
                                     loss="", rate="")

            def report(index: int, epoch: int, loss: float | None) -> None:
                progress.update(task, completed=index * epochs + epoch,
                                loss=f"expert {index + 1}/{count}")
                done = "trained before" if loss is None else f"loss {loss:.4g}"
                epoch_lines(epoch, epochs, f"expert {index + 1}/{count}: epoch {epoch}/{epochs}"
                                           f"  {done}")

            buffer = train_experts(config, count, folder, callback=report, data=data)
    except (DatasetError, ExpertBufferError, ValueError) as exc:
        raise _fail(str(exc)) from None
    results.print(f"expert buffer ready: {buffer.count} trajectories x {buffer.epochs + 1} "
                  f"checkpoints in {folder}")


if __name__ == "__main__":
    app()
