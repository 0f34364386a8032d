"""Which torch device a config's `device` string means. Its own module: the data, the
objectives, the expert trainer and the evaluation all need it, and none should import another
for it."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when there is one, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


__all__ = ["resolve_device"]
