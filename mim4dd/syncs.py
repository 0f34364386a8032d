"""Counting the operations that make the host wait for the device, on any device.

On a GPU, reading a value back (`.item()`, `float(t)`, `if t:`) or an operation whose output
size depends on the data (`nonzero`, boolean-mask indexing, `masked_select`) stalls the host
until every queued kernel has run. `SyncCounter` counts them as they are dispatched, so a test
on the CPU sees the syncs a GPU run would pay (`tests/test_syncs.py`), and it counts copies
between devices when it runs on a GPU.

    with SyncCounter() as syncs:
        distiller.step()
    print(syncs.total, syncs.by_op)
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that read a value back to the host, or whose output size depends on the data.
READS_BACK = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t)
    aten.nonzero.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
}


def _boolean_index(func, args) -> bool:
    """t[mask]: `index` with a boolean index computes the mask's nonzero positions."""
    if func is not aten.index.Tensor:
        return False
    return any(i is not None and i.dtype == torch.bool for i in args[1])


def _crosses_devices(func, args, kwargs) -> bool:
    """A copy between the host and a device (`.to`, `.cuda()`, `copy_` across devices)."""
    if func is aten._to_copy.default:
        source, target = args[0].device, kwargs.get("device")
    elif func is aten.copy_.default:
        source, target = args[1].device, args[0].device
    else:
        return False
    # The meta device holds no data (a network's weightless skeleton): nothing travels.
    return target is not None and "meta" not in (source.type, torch.device(target).type) \
        and torch.device(target) != source


class SyncCounter(TorchDispatchMode):
    """Counts, while active, the ops that make the host wait for the device (`syncs`) and the
    copies between devices (`transfers`), by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.transfers: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS_BACK or _boolean_index(func, args):
            self.by_op[str(func.overloadpacket.__name__)] += 1
        elif _crosses_devices(func, args, kwargs):
            self.transfers[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)


__all__ = ["READS_BACK", "SyncCounter"]
