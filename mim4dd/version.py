"""`--version` of both command lines (`mim4dd`, `mim4dd-sweep`): the installed version, then
exit. Its own module so that the sweep service's CLI gets it without importing the engine."""

from __future__ import annotations

from typing import Annotated

import typer

from mim4dd import __version__


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"mim4dd {__version__}")
        raise typer.Exit()


VersionOption = Annotated[bool, typer.Option(
    "--version", callback=show_version, is_eager=True, help="Print the version and exit.")]

__all__ = ["VersionOption", "show_version"]
