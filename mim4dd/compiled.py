"""Optional `torch.compile` of the networks' forward passes, with a clean fallback.

Compiling fuses the element-wise work around each convolution (norm, ReLU, pooling). On the
2-core CPU it measured ~30% faster per ConvNet forward after ~5-20 s of compilation per
process, and freshly built networks of one architecture reuse the compiled code, so the DM
probe (a new network every step) and every evaluation network share it
(benchmarks/bench_speed.py --compile). Off by default (`Config.compile`): short runs and tests
would spend more time compiling than they save, and it needs a C++ compiler on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class MaybeCompiled:
    """`fn(net, x)` through `torch.compile` when enabled; if compiling fails (no compiler, an
    unsupported op), one warning and the plain function from then on."""

    def __init__(self, fn: Callable, enabled: bool):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=False) if enabled else None

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any failure to compile means: run plain
                log.warning("torch.compile failed (%s: %s); running uncompiled",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self.compiled = None
        return self.fn(*args)


def block_features(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return net.block_features(x)


def forward(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x)
