"""Settings given as dotted paths (``eval.epochs=3``): building the tree, reading it back, and
pydantic's errors as one readable line each. Shared by the engine CLI and the sweep files."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError


def set_dotted(tree: dict[str, Any], path: str, value: Any) -> None:
    """tree["a"]["b"]["c"] = value for path "a.b.c", creating the mappings on the way."""
    *parents, last = path.split(".")
    node = tree
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ValueError(f"cannot set {path!r}: {name!r} holds a value, not a mapping")
        node = child
    node[last] = value


def get_dotted(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for name in path.split("."):
        node = node[name]
    return node


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def loc_text(loc: tuple[Any, ...], top: bool = True) -> str:
    """("grid", "ipc", 1) -> "grid.ipc[1]"."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    return text.removeprefix(".") if top else text


def describe_error(err: Mapping[str, Any]) -> str:
    """A pydantic error as one readable phrase, with the offending value."""
    if err["type"] == "literal_error":
        return f"{short_repr(err['input'])} is not allowed (allowed: {err['ctx']['expected']})"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] != "missing" and "input" in err:
        got = short_repr(err["input"])
        if not (err["type"] == "value_error" and got in message):  # our validators quote it
            message += f" (got {got})"
    return message


def validation_problems(exc: ValidationError, root: str = "config") -> list[str]:
    """One "field.path: message" line per error of a failed validation."""
    return [f"{loc_text(err['loc']) or root}: {describe_error(err)}" for err in exc.errors()]


__all__ = ["describe_error", "get_dotted", "loc_text", "set_dotted", "short_repr",
           "validation_problems"]
