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

from mim4dd.config import Config
from mim4dd.data import DatasetError
from mim4dd.distill import DistillCallback, Distiller
from mim4dd.objectives import DivergenceError
from mim4dd.experiment import ExperimentResult, evaluate_synset, load_data
from mim4dd.synset import SyntheticSet, SyntheticSetError

app = typer.Typer(help="MIM4DD dataset distillation engine.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console(stderr=True, soft_wrap=True)  # paths and messages stay greppable

STATE_FILE = "state.pt"
RESULTS_FILE = "results.json"


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(2)


def _parse_assignment(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise _fail(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)  # YAML typing: 0.8 -> float, [1,2] -> list


def _build_config(config_file: Path | None, settings: dict[str, Any]) -> Config:
    tree: dict[str, Any] = {}
    if config_file is not None:
        tree = yaml.safe_load(config_file.read_text()) or {}
    for dotted, value in settings.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise _fail(f"invalid configuration:\n{problems}") from None


def default_out_dir(config: Config) -> Path:
    """Derived from the config, so re-running the same command finds (and resumes) its run."""
    return Path("runs") / f"{config.dataset}-ipc{config.ipc}-{config.base}-lam{config.lam:g}-seed{config.seed}"


class _ProgressCallback(DistillCallback):
    """A rich progress bar with the loss, plus a resumable state file every N iterations."""

    def __init__(self, progress: Progress, task, state_path: Path, distiller: Distiller):
        self.progress, self.task, self.state_path, self.distiller = progress, task, state_path, distiller

    def on_iteration(self, iteration: int, metrics: dict[str, float]) -> None:
        loss = f"loss {metrics['loss']:.4g} (base {metrics['loss_base']:.4g}"
        loss += f", mim {metrics['loss_mim']:.4g})" if "loss_mim" in metrics else ")"
        self.progress.update(self.task, completed=iteration, loss=loss,
                             rate=f"{1 / max(metrics['seconds_per_iteration'], 1e-9):.2f} it/s")

    def on_checkpoint(self, iteration: int, state: dict) -> None:
        self.distiller.save_state(self.state_path)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[loss]}"),
        console=console,
    )


@app.command()
def distill(
    config_file: Annotated[Optional[Path], typer.Option("--config", help="YAML with Config fields")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="MNIST, FashionMNIST, SVHN, CIFAR10, CIFAR100, digits, ImageFolder")] = None,
    ipc: Annotated[Optional[int], typer.Option(help="synthetic images per class")] = None,
    lam: Annotated[Optional[float], typer.Option(help="weight of the MIM term (0 = base method)")] = None,
    iterations: Annotated[Optional[int], typer.Option()] = None,
    batch_real: Annotated[Optional[int], typer.Option(help="real images per class per step")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    data_root: Annotated[Optional[str], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = None,
    eval_epochs: Annotated[Optional[int], typer.Option(help="epochs per evaluation network")] = None,
    eval_nets: Annotated[Optional[int], typer.Option(help="networks trained in the evaluation")] = None,
    settings: Annotated[Optional[list[str]], typer.Option("--set", help="any Config field: --set model.width=64")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output folder (default: derived from the config)")] = None,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="evaluate the distilled set")] = True,
    checkpoint_every: Annotated[int, typer.Option(help="iterations between resumable state saves")] = 100,
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
    results_path, state_path = out / RESULTS_FILE, out / STATE_FILE
    if not force and results_path.exists():
        done = json.loads(results_path.read_text())
        if done.get("config") == config.model_dump(mode="json"):
            console.print(f"{out} already holds this run; nothing to do (--force to redo).")
            return
    try:
        data = load_data(config)
        distiller = Distiller(config, data)
        if state_path.exists() and not force:
            distiller.load_state(state_path)
            console.print(f"resuming from {state_path} at iteration {distiller.iteration}")
        out.mkdir(parents=True, exist_ok=True)
        with _progress() as progress:
            task = progress.add_task(f"distill {config.dataset} ipc={config.ipc} λ={config.lam:g}",
                                     total=config.iterations, completed=distiller.iteration,
                                     loss="", rate="")
            callback = _ProgressCallback(progress, task, state_path, distiller)
            synset = distiller.run(callback, checkpoint_every=checkpoint_every)
        evaluation = None
        if evaluate:
            with console.status(f"evaluating: {config.eval.num_nets} networks x "
                                f"{config.eval.epochs} epochs"):
                evaluation = evaluate_synset(synset, config, data)
    except (DatasetError, DivergenceError, ValueError) as exc:
        raise _fail(str(exc)) from None
    ExperimentResult(synset, evaluation).save(out)
    state_path.unlink(missing_ok=True)
    console.print(f"wrote {out} (synset.safetensors, manifest.json, grid.png, {RESULTS_FILE})")
    if evaluation is not None:
        console.print(f"test accuracy: [bold]{evaluation}[/bold]  (validation {100 * evaluation.val_mean:.2f} %)")


@app.command("evaluate")
def evaluate_command(
    path: Annotated[Path, typer.Argument(help="a saved synthetic set folder")],
    epochs: Annotated[Optional[int], typer.Option()] = None,
    num_nets: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option(help="first evaluation network's seed")] = None,
    data_root: Annotated[Optional[str], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    out: Annotated[Optional[Path], typer.Option(help="results JSON (default PATH/evaluation.json)")] = None,
) -> None:
    """Train fresh networks on a saved set and test them on the real test split."""
    try:
        synset = SyntheticSet.load(path)
    except SyntheticSetError as exc:
        raise _fail(str(exc)) from None
    tree = synset.manifest["config"]
    overrides = {"epochs": epochs, "num_nets": num_nets, "seed": seed}
    tree["eval"].update({k: v for k, v in overrides.items() if v is not None})
    tree.update({k: v for k, v in {"data_root": data_root, "device": device}.items() if v})
    config = Config.model_validate(tree)
    try:
        with console.status(f"evaluating {path}: {config.eval.num_nets} networks x "
                            f"{config.eval.epochs} epochs"):
            evaluation = evaluate_synset(synset, config)
    except DatasetError as exc:
        raise _fail(str(exc)) from None
    out = out or path / "evaluation.json"
    out.write_text(json.dumps({"set": str(path), "eval": config.eval.model_dump(mode="json"),
                               "evaluation": evaluation.to_dict()}, indent=2) + "\n")
    console.print(f"test accuracy: [bold]{evaluation}[/bold]; wrote {out}")


@app.command("experts")
def experts_command(
    config_file: Annotated[
        Optional[Path], typer.Option("--config", help="YAML with Config fields")
    ] = None,
    dataset: Annotated[Optional[str], typer.Option(help="dataset the experts train on")] = None,
    seed: Annotated[
        Optional[int], typer.Option(help="run seed (it fixes the validation split)")
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

    values = {"dataset": dataset, "seed": seed, "data_root": data_root, "device": device}
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

            def report(index: int, epoch: int) -> None:
                progress.update(task, completed=index * epochs + epoch,
                                loss=f"expert {index + 1}/{count}")

            buffer = train_experts(config, count, folder, callback=report, data=data)
    except (DatasetError, ExpertBufferError, ValueError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"expert buffer ready: {buffer.count} trajectories x {buffer.epochs + 1} "
                  f"checkpoints in {folder}")


if __name__ == "__main__":
    app()
