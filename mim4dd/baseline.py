"""The random-real baseline, evaluated once per key and reused from an on-disk cache.

`experiment.evaluate_random_baseline` (the same evaluation of `ipc` random real training images
per class) depends only on the data, the IPC, the seed and the evaluation protocol, not on the
distillation, so every trial of a sweep that differs only in λ, base or iterations would compute
the same numbers. `random_baseline` computes them once per `baseline_key` and keeps them in
``<data cache>/baselines/<dataset>-ipc<n>-seed<s>-<key digest>.json`` (beside the expert
buffers; `data_root`, else $MIM4DD_DATA, else ~/.cache/mim4dd/data). The file is JSON, written
atomically: concurrent trials at most compute it twice, never read half a file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from mim4dd import experiment
from mim4dd.atomic import write_atomic
from mim4dd.config import Config
from mim4dd.data import RealData, candidate_roots
from mim4dd.device import resolve_device
from mim4dd.evaluate import EvalResult, NetResult, network_seeds
from mim4dd.experts import key_digest
from mim4dd.metrics import random_metric

FORMAT_VERSION = 1
FOLDER = "baselines"


def baseline_key(config: Config) -> dict:
    """Everything the random-real evaluation depends on; equal keys give equal numbers."""
    return {
        "format_version": FORMAT_VERSION,
        "what": "random real subset",
        # the data: which images, which train/val split, which space
        "dataset": config.dataset, "data_root": config.data_root,
        "split": {"val_fraction": config.val_fraction, "seed": config.split_seed},
        "zca": config.zca,
        # the subset: `experiment.random_real_subset`
        "ipc": config.ipc, "seed": config.seed,
        # the protocol: networks, training, augmentation, and where it ran (CPU and CUDA
        # kernels round differently)
        "eval": config.eval.model_dump(mode="json"),
        "model": config.model.model_dump(mode="json"),
        "dsa_strategy": config.dsa_strategy if config.eval.dsa else "none",
        "device_type": resolve_device(config.device).type,
    }


def baseline_path(config: Config) -> Path:
    cache = candidate_roots(config.data_root)[0] / FOLDER
    name = f"{config.dataset}-ipc{config.ipc}-seed{config.seed}"
    return cache / f"{name}-{key_digest(baseline_key(config))}.json"


def random_baseline(config: Config, data: RealData | None = None) -> EvalResult:
    """`experiment.evaluate_random_baseline(config, data)`, from the cache when it holds this
    key, else computed and stored. `data` (loaded when None) is only read on a miss."""
    path, key = baseline_path(config), baseline_key(config)
    if (cached := _read(path, key)) is not None:
        return cached
    result = experiment.evaluate_random_baseline(config, data)
    seeds = network_seeds(config.eval, config.seed)
    networks = [asdict(NetResult(r.architecture, i, seeds[i], test, val))
                for r in result.by_architecture.values()
                for i, (test, val) in enumerate(_pairs(r))]
    text = json.dumps({"key": key, "models": config.eval.models, "lr": result.lr,
                       "networks": networks}, indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return result


def random_metrics(result: EvalResult) -> dict[str, float]:
    """A baseline's metrics (%) under their `random_metric` names, beside the set's own."""
    return {random_metric(name): value for name, value in result.metrics().items()}


def _pairs(result: EvalResult) -> list[tuple[float, float | None]]:
    vals = result.val_accuracies or [None] * len(result.test_accuracies)  # no validation split
    return list(zip(result.test_accuracies, vals, strict=True))


def _read(path: Path, key: dict) -> EvalResult | None:
    """The cached result, or None when there is none (or it is unreadable: recomputed)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["key"] != key:  # a digest collision, or a hand-edited file
            return None
        networks = [NetResult(**net) for net in saved["networks"]]
        return EvalResult.from_networks(saved["models"], networks, saved["lr"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError):
        logging.getLogger(__name__).warning("unreadable baseline cache %s; recomputing", path)
        return None


__all__ = ["FOLDER", "baseline_key", "baseline_path", "random_baseline", "random_metrics"]
