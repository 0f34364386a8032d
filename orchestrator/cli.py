"""`mim4dd-sweep`: launch a sweep file, watch it, read its table, pull a distilled set back.

`experts` trains only the expert buffers of a sweep's trajectory-matching trials; `evaluate`
adds architectures to a finished sweep's evaluation. The commands parse arguments and print;
the work is in `orchestrator.service`, `.queries` and `.reevaluate`. Heavy imports (Ray,
MLflow) happen inside the commands, so a bad sweep file fails fast and starts nothing.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mim4dd.version import VersionOption
from orchestrator.locks import stop_on_sigterm
from orchestrator.retrying import StoreError, impatient_http
from orchestrator.spec import SpecError, SweepSpec, load_spec

app = typer.Typer(name="mim4dd-sweep", no_args_is_help=True, add_completion=False)
# Keys, URIs and run ids on one line; in a log or pipe tables too (not wrapped at 80 columns).
out = Console(soft_wrap=True, width=None if os.isatty(1) else 1000)
err = Console(stderr=True)


@app.callback()
def main(ctx: typer.Context, version: VersionOption = False) -> None:
    """Run MIM4DD distillation sweeps on Ray Tune, tracked in MLflow."""
    if ctx.invoked_subcommand in ("list", "status", "report", "pull"):  # read commands:
        impatient_http()  # an unreachable server is one line within seconds, not minutes

class ReportFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", show_default=False,
    help="MLflow tracking URI (default: the embedded store in $MIM4DD_HOME or ./.mim4dd).",
)]
Address = Annotated[str | None, typer.Option(
    help="Ray cluster address (default: the sweep file's ray_address where a file is given, "
         "$RAY_ADDRESS, or a local in-process cluster).",
)]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(message, err=True)  # plain echo: rich would read "[1]" in messages as markup
    return typer.Exit(code)


def _show(rows: list[dict[str, Any]], title: str = "") -> None:
    """Rows as a table on stdout."""
    table = Table(title=title or None)
    for column in rows[0] if rows else []:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*("" if v is None else escape(str(v)) for v in row.values()))
    out.print(table)


@app.command()
def launch(
    spec_file: Annotated[Path, typer.Argument(help="The sweep YAML file.")],
    address: Address = None,
    tracking_uri: TrackingUri = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate and list the trials and the expert buffers they need; "
                          "start and log nothing.")] = False,
    max_trials: Annotated[int | None, typer.Option(
        min=1, help="Refuse a sweep with more trials (default: the file's max_trials, "
                    "else 10000).")] = None,
) -> None:
    """Run a sweep's unfinished trials (missing expert buffers first); relaunching resumes."""
    spec = _load(spec_file, address, tracking_uri, max_trials)
    stop_on_sigterm()
    from orchestrator.experts import ExpertStageError
    from orchestrator.locks import SweepLockedError
    from orchestrator.preflight import PreflightError
    from orchestrator.service import launch as run_sweep
    from orchestrator.tune_run import PendingTimeoutError

    try:
        outcome = run_sweep(spec, dry_run=dry_run, progress=True, console=err, source=spec_file)
    except ExpertStageError as exc:
        raise _fail(f"expert stage failed; no trial was started:\n{exc}") from None
    except (SweepLockedError, StoreError) as exc:  # a store error may come mid-launch: as is
        raise _fail(str(exc) if isinstance(exc, StoreError) else f"not launched: {exc}") from None
    except PreflightError as exc:
        raise _fail(f"not launched; nothing was started:\n{exc}", 2) from None
    except PendingTimeoutError as exc:
        raise _fail(f"stopped: {exc}; relaunch once the resources are there") from None
    if dry_run:
        _show(outcome.table, f"{spec.name}: {outcome.total} trials (dry run)")
        if outcome.buffers:
            _show(outcome.buffers, "expert buffers (as seen from this machine)")
        return
    if outcome.summary is not None and not outcome.summary.empty:
        _print_summary(outcome.summary, spec.name)
    out.print(f"[bold]{spec.name}[/]: {escape(outcome.counts())}")
    for key, reason in outcome.failed.items():
        out.print(f"  [red]failed[/] {escape(key)}: {escape(reason)}", highlight=False)
    out.print(f"tracking: {outcome.tracking_uri}  parent run: {outcome.parent_run_id}")
    if outcome.failed or outcome.unfinished:
        out.print("run the same command again to retry failed and resume unfinished trials")
        raise typer.Exit(1)


@app.command()
def experts(
    spec_file: Annotated[Path, typer.Argument(help="The sweep YAML file.")],
    address: Address = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Train the expert buffers a sweep's trajectory-matching trials need, and nothing else."""
    spec = _load(spec_file, address, tracking_uri)
    stop_on_sigterm()
    from orchestrator.experts import ExpertStageError
    from orchestrator.locks import SweepLockedError
    from orchestrator.service import prepare_experts

    try:
        buffers = prepare_experts(spec, console=err)
    except ExpertStageError as exc:
        raise _fail(f"expert stage failed:\n{exc}") from None
    except (SweepLockedError, StoreError) as exc:
        raise _fail(f"not started: {exc}") from None
    if not buffers:
        out.print(f"{spec.name}: no trial uses base mtt; no expert buffer is needed")
        return
    rows = [{"buffer": b.digest, "experts": b.count, "trained now": len(b.trained),
             "trials": len(b.trials), "folder": b.directory} for b in buffers]
    _show(rows, f"{spec.name}: expert buffers ready")


def _load(
    spec_file: Path, address: str | None, tracking_uri: str | None, max_trials: int | None = None
) -> SweepSpec:
    try:
        spec = load_spec(spec_file, address=address, tracking_uri=tracking_uri,
                         max_trials=max_trials)
    except SpecError as exc:
        raise _fail(f"invalid sweep file {spec_file}:\n{exc}", 2) from None
    for notice in spec.notices:
        typer.echo(f"{spec_file}: {notice}", err=True)
    return spec


def _print_summary(summary: Any, name: str, architectures: Any = None, legend=False) -> None:
    from orchestrator import aggregate, cross_arch

    _show(aggregate.display_rows(summary), f"{name}: test accuracy (mean ± std)")
    if architectures is not None and not architectures.empty:
        _show(cross_arch.display_rows(architectures), f"{name}: {cross_arch.TITLE}")
    if legend:
        out.print(aggregate.legend(summary), highlight=False)


@app.command("list")
def list_command(tracking_uri: TrackingUri = None) -> None:
    """The sweeps in the store, newest first, with their status and trial counts."""
    from orchestrator.queries import list_sweeps

    try:
        rows = list_sweeps(tracking_uri)
    except LookupError as exc:
        raise _fail(str(exc)) from None
    if not rows:
        err.print("no sweeps in this store yet")
        return
    _show(rows)


@app.command()
def stop(name: Annotated[str, typer.Argument(help="Sweep name.")]) -> None:
    """Stop a sweep launched on this machine, from another terminal: as Ctrl-C in its own, so
    its runs end KILLED and launching it again resumes them."""
    from orchestrator.locks import stop_launch
    from orchestrator.tracking import home

    try:
        pid = stop_launch(name, home())
    except LookupError as exc:
        raise _fail(str(exc)) from None
    out.print(f"asked launch {pid} of {name} to stop; its runs end KILLED")


@app.command()
def status(
    name: Annotated[str, typer.Argument(help="Sweep name.")], tracking_uri: TrackingUri = None,
) -> None:
    """Trials done / running / failed, with each trial's progress, from MLflow."""
    from orchestrator.queries import sweep_status

    try:
        report = sweep_status(name, tracking_uri)
    except LookupError as exc:
        raise _fail(str(exc)) from None
    out.print(f"[bold]{escape(name)}[/] ({report.run_status}): {escape(report.counts())}")
    rows = [{
        "trial": t["key"], "status": t["status"],
        "progress": f"{t['iteration']}/{t['iterations']}",
        "test acc %": "" if t["test_acc_pct"] is None else f"{t['test_acc_pct']:.2f}",
        "failure": t["failure"][:80],
    } for t in report.trials]
    if rows:
        _show(rows)


@app.command()
def report(
    name: Annotated[str, typer.Argument(help="Sweep name.")], tracking_uri: TrackingUri = None,
    fmt: Annotated[ReportFormat, typer.Option(
        "--format", help="table for people; csv or json (all columns, accuracies and paired "
                         "differences in %) for programs.")] = ReportFormat.table,
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="Write the csv or json to this file instead of stdout.")] = None,
) -> None:
    """The aggregated accuracy table of a sweep (mean ± std per grid cell)."""
    from mim4dd.atomic import write_atomic
    from orchestrator.queries import sweep_report

    try:
        report = sweep_report(name, tracking_uri)
    except LookupError as exc:
        raise _fail(str(exc)) from None
    if report.superseded:
        err.print(f"note: {len(report.superseded)} trial(s) also have finished results of an "
                  f"older config, not shown: {escape(', '.join(report.superseded))}",
                  highlight=False)
    if report.summary.empty:
        raise _fail(f"sweep {name!r} has no finished trials yet (of its current config)")
    if fmt is not ReportFormat.table:
        text = report.as_text(fmt.value)
        if out_file is None:
            typer.echo(text, nl=False)
        else:
            write_atomic(out_file, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            err.print(f"wrote {out_file}", highlight=False)
        return
    if out_file is not None:
        raise _fail("--out takes --format csv or json", 2)
    _print_summary(report.summary, name, report.architectures, legend=True)


@app.command()
def evaluate(
    models: Annotated[str, typer.Option(help="Architectures, comma-separated (mim4dd/zoo.py).")],
    name: Annotated[str, typer.Argument(help="Sweep name.")], tracking_uri: TrackingUri = None,
    address: Address = None,
    cpus: Annotated[float, typer.Option(min=0.1, help="CPUs per trial's Ray task.")] = 1.0,
    gpus: Annotated[float, typer.Option(min=0, help="GPUs per trial's Ray task.")] = 0.0,
) -> None:
    """Evaluate a sweep's finished sets on more architectures (a Ray task each), into each
    trial's run."""
    from orchestrator.reevaluate import SweepLockedError, evaluate_sweep

    try:
        rows = evaluate_sweep(name, models, tracking_uri, say=err.print, address=address,
                              resources={"num_cpus": cpus, "num_gpus": gpus})
    except (LookupError, ValueError, SweepLockedError) as exc:
        raise _fail(str(exc)) from None
    _show(rows, f"{name}: evaluated on {models}")
    raise typer.Exit(int(any(row["error"] for row in rows)))  # 1 when a trial failed


@app.command()
def pull(
    target: Annotated[str, typer.Argument(help="A trial's MLflow run id, or a sweep name.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the set into.")],
    dataset: Annotated[str | None, typer.Option(
        help="With a sweep name: the trial's dataset.")] = None,
    ipc: Annotated[int | None, typer.Option(help="... its images per class.")] = None,
    lam: Annotated[float | None, typer.Option(help="... its MIM weight lambda.")] = None,
    seed: Annotated[int | None, typer.Option(help="... its seed.")] = None,
    where: Annotated[list[str] | None, typer.Option(
        help="... any other setting, PATH=VALUE (repeatable), e.g. eval.epochs=300.")] = None,
    tracking_uri: TrackingUri = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Write into OUT even if it holds files (a set's files are replaced).")
    ] = False,
) -> None:
    """Download a trial's synthetic set, verify its checksum, and say how to load it."""
    from orchestrator.queries import parse_where, pull_set

    try:
        values = {"dataset": dataset, "ipc": ipc, "lam": lam, "seed": seed,
                  **parse_where(where or [])}
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    try:
        folder, run_id = pull_set(target, out_dir, tracking_uri, values, force=force)
    except (LookupError, ValueError) as exc:  # SyntheticSetError is a ValueError
        raise _fail(f"cannot pull {target}: {exc}") from None
    except Exception as exc:  # MLflow: unknown run id, unreachable server
        raise _fail(f"cannot pull {target}: {type(exc).__name__}: {exc}") from None
    out.print(f"pulled run {run_id} to {folder} (sha256 verified)")
    out.print("load it with:\n"
              "    from mim4dd.synset import SyntheticSet\n"
              f"    dataset = SyntheticSet.load({str(folder)!r}).to_dataset()", highlight=False)


@app.command()
def ui(
    sweep: Annotated[str | None, typer.Argument(
        help="A sweep whose runs table to link to.", show_default=False)] = None,
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 5000,
    host: Annotated[str, typer.Option(help="Address to bind (local only by default).")] =
        "127.0.0.1",
    workers: Annotated[int, typer.Option(min=1, help="UI server processes.")] = 1,
    tracking_uri: TrackingUri = None,
    open_browser: Annotated[bool, typer.Option(
        "--open", help="Also open the link in your browser ($BROWSER) once the UI answers.")
    ] = False,
) -> None:
    """Open the MLflow UI on the embedded store (runs `mlflow ui`)."""
    from orchestrator import browser, tracking
    from orchestrator.queries import sweep_link, ui_command
    from orchestrator.server import NO_JOBS_ENV

    uri = tracking.resolve_tracking_uri(tracking_uri)
    base = f"http://{host}:{port}"
    if not tracking.is_embedded(uri):
        link = f"; sweep {sweep}: {sweep_link(sweep, uri, uri)}" if sweep else ""
        raise _fail(f"{uri} is a tracking server already: open it in a browser{link}")
    link = base
    if sweep:
        try:
            link = sweep_link(sweep, base, uri)
        except LookupError as exc:
            raise _fail(str(exc)) from None
        out.print(f"sweep {sweep}: {link}", highlight=False)
    command = ui_command(uri, host, port, workers)
    err.print(f"MLflow UI on {base} for {uri}")
    if open_browser:
        browser.open_when_up(base, link)
    # Replace this process (Ctrl-C stops the UI directly), without MLflow's job consumers.
    os.execve(command[0], command, {**NO_JOBS_ENV, **os.environ})


if __name__ == "__main__":
    app()
