"""The names of an evaluation's metrics, the one place they are spelled: logged by the sweep
service, read back by its status, report and aggregation. Torch-free, so those read commands
need not import the engine.
"""

from __future__ import annotations

import re

# In percent, the unit people read (an EvalResult keeps fractions), and every name says so.
EVAL_PREFIX = "eval/"
TEST_ACC_MEAN = f"{EVAL_PREFIX}test_acc_mean_pct"
TEST_ACC_STD = f"{EVAL_PREFIX}test_acc_std_pct"
VAL_ACC_MEAN = f"{EVAL_PREFIX}val_acc_mean_pct"
NET_TEST_ACC = re.compile(rf"^{EVAL_PREFIX}test_acc_net(\d+)_pct$")  # group 1: the network


def net_metric(split: str, index: int) -> str:
    """Name of network `index`'s accuracy (%) on `split` ("test" or "val")."""
    return f"{EVAL_PREFIX}{split}_acc_net{index}_pct"


# A cross-architecture evaluation also names every metric above per architecture:
# eval/resnet18/test_acc_mean_pct, eval/resnet18/test_acc_net0_pct, ... (the unnamed ones are
# those of its first architecture, the headline).
ARCH_METRIC = re.compile(rf"^{EVAL_PREFIX}([a-z0-9_]+)/(.+)$")  # groups: architecture, rest


def arch_metric(arch: str, name: str) -> str:
    """Metric `name` (one of the names above) of architecture `arch`."""
    return f"{EVAL_PREFIX}{arch}/{name.removeprefix(EVAL_PREFIX)}"


# The same evaluation of a random real subset of the same size (mim4dd/baseline.py): every
# name above with "random_" after the prefix, e.g. eval/random_test_acc_mean_pct (not
# eval/random/...: that would read as an architecture named "random").
RANDOM = "random_"
RANDOM_TEST_ACC_MEAN = f"{EVAL_PREFIX}{RANDOM}test_acc_mean_pct"


def random_metric(name: str) -> str:
    """The random-real baseline's counterpart of metric `name`."""
    arch, rest = metric_architecture(name)
    rest = EVAL_PREFIX + RANDOM + rest.removeprefix(EVAL_PREFIX)
    return arch_metric(arch, rest) if arch else rest


def metric_architecture(name: str) -> tuple[str | None, str]:
    """(architecture, the name without it), the inverse of `arch_metric`; (None, name) for a
    headline name: `metric_architecture(arch_metric(a, TEST_ACC_MEAN)) == (a, TEST_ACC_MEAN)`."""
    if match := ARCH_METRIC.match(name):
        return match[1], EVAL_PREFIX + match[2]
    return None, name


__all__ = ["ARCH_METRIC", "EVAL_PREFIX", "NET_TEST_ACC", "RANDOM", "RANDOM_TEST_ACC_MEAN",
           "TEST_ACC_MEAN", "TEST_ACC_STD", "VAL_ACC_MEAN", "arch_metric", "metric_architecture",
           "net_metric", "random_metric"]
