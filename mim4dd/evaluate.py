"""Evaluation: train N fresh, seeded networks of every architecture of the evaluation pool
(`EvalConfig.models`, mim4dd/zoo.py) on a synthetic set; test on the real test split.

The N networks can train together: their parameters are stacked and one `torch.func.vmap`
call runs all of them on their own batches, which keeps a GPU busy with small synthetic
batches. On CPU each convolution already fills the cores and vmap measured slower, so by
default networks train together on CUDA only (`EvalConfig.parallel`). Sequential evaluation
trains groups of one network, each a plain module (no vmap); a test checks that both paths
reach the same accuracies (benchmarks/bench_evaluate.py measures the ratio). Batch-norm
networks always train one at a time, as plain modules that keep running statistics: train mode
while training, eval mode when tested, as in the reference code.

Each network is a function of its seed alone (`network_seed`: by default drawn from the run
seed and its index, so the spread over run seeds includes initialisation), so an evaluation
can stop after any network and resume without redoing the finished ones
(`Evaluator.evaluate(done=..., on_network=...)`).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from mim4dd.augment import DSA
from mim4dd.compiled import MaybeCompiled, forward
from mim4dd.config import EvalConfig, ModelConfig
from mim4dd.data import RealData, Split
from mim4dd.memory import keep_freed_memory
from mim4dd.metrics import TEST_ACC_MEAN, TEST_ACC_STD, VAL_ACC_MEAN, arch_metric, net_metric
from mim4dd.models import memory_format
from mim4dd.zoo import DEFAULT_ARCHITECTURE, build_network, uses_batch_norm

# Test images per forward pass: 256 keeps a width-128 ConvNet's largest activation at 134 MB
# (1024 measured no faster and held 0.5 GB per map).
TEST_BATCH = 256
# Evaluation networks draw their seeds from their own stream, apart from a run's steps (0),
# initial images (1) and per-step heads (2) (`distill.step_seed`).
EVAL_STREAM = 3


def network_seed(config: EvalConfig, run_seed: int, index: int) -> int:
    """The seed network `index` of every architecture is initialised and shuffled from."""
    if config.net_seeds == "shared":
        return config.seed + index
    entropy = [run_seed, EVAL_STREAM, config.seed, index]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def network_seeds(config: EvalConfig, run_seed: int) -> list[int]:
    """The seeds of networks 0 .. num_nets - 1 (`network_seed`)."""
    return [network_seed(config, run_seed, i) for i in range(config.num_nets)]


def _percent(fraction: float) -> float:
    # Rounded far below any accuracy's resolution: 0.29 shows as 29.0, not as
    # 28.999999999999996 in the MLflow UI.
    return round(100 * fraction, 9)


@dataclass(frozen=True)
class NetResult:
    """One finished evaluation network: what a caller saves to resume an evaluation."""

    architecture: str
    index: int  # network i of its architecture: initialised and shuffled from `seed`
    seed: int
    test_accuracy: float  # in [0, 1]
    val_accuracy: float | None  # None without a validation split


@dataclass(frozen=True)
class NetEpoch:
    """An evaluation network finished an epoch of training: progress to show, not a result."""

    architecture: str
    index: int
    epoch: int  # 1 .. epochs
    epochs: int
    loss: float  # its mean training loss over the epoch


@dataclass
class EvalResult:
    """The networks of one architecture (the headline: `EvalConfig.models[0]`), and `others`:
    the results of the pool's further architectures, in `EvalConfig.models` order."""

    test_accuracies: list[float]  # one per network, in [0, 1]
    val_accuracies: list[float]
    lr: float
    architecture: str = DEFAULT_ARCHITECTURE
    others: list[EvalResult] = field(default_factory=list)

    @classmethod
    def from_networks(
        cls, models: list[str], networks: Iterable[NetResult], lr: float,
    ) -> EvalResult:
        """The result of these finished networks (all of an evaluation, or those so far)."""
        ordered = sorted(networks, key=lambda net: net.index)
        head, *others = [
            cls([n.test_accuracy for n in ordered if n.architecture == arch],
                [n.val_accuracy for n in ordered
                 if n.architecture == arch and n.val_accuracy is not None], lr, arch)
            for arch in models
        ]
        head.others = others
        return head

    @property
    def by_architecture(self) -> dict[str, EvalResult]:
        return {result.architecture: result for result in [self, *self.others]}

    @property
    def per_architecture(self) -> bool:
        """Whether anything but the default ConvNet alone was evaluated. Then every
        architecture also has its own metric names and results entry, so that no number's
        architecture is implicit; the default evaluation keeps exactly its old names."""
        return bool(self.others) or self.architecture != DEFAULT_ARCHITECTURE

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test_accuracies) if self.test_accuracies else float("nan")

    @property
    def std(self) -> float:
        # Population std over the networks, as the DD literature reports it.
        return statistics.pstdev(self.test_accuracies) if self.test_accuracies else float("nan")

    @property
    def val_mean(self) -> float:
        return statistics.fmean(self.val_accuracies) if self.val_accuracies else float("nan")

    def metrics(self) -> dict[str, float]:
        """Per-network and summary accuracies in percent, by their metric names; in a
        cross-architecture evaluation, also every architecture's under `arch_metric` names."""
        found = self._own_metrics()
        if self.per_architecture:
            for arch, result in self.by_architecture.items():
                found |= {arch_metric(arch, k): v for k, v in result._own_metrics().items()}
        return found

    def architecture_metrics(self) -> dict[str, float]:
        """Every architecture's metrics under its `arch_metric` names only, whichever the
        headline: what an evaluation added to a run that has its headline already logs."""
        return {arch_metric(arch, k): v for arch, result in self.by_architecture.items()
                for k, v in result._own_metrics().items()}

    def _own_metrics(self) -> dict[str, float]:
        found = {net_metric("test", i): a for i, a in enumerate(self.test_accuracies)}
        found |= {net_metric("val", i): a for i, a in enumerate(self.val_accuracies)}
        if self.test_accuracies:  # an evaluation under way may have none yet
            found |= {TEST_ACC_MEAN: self.mean, TEST_ACC_STD: self.std}
        if self.val_accuracies:
            found[VAL_ACC_MEAN] = self.val_mean
        return {name: _percent(value) for name, value in found.items()}

    def to_dict(self) -> dict:
        """The headline's numbers; in a cross-architecture evaluation also "architectures":
        every architecture's (the headline's included), in evaluation order."""
        found = self._summary()
        if self.per_architecture:
            found["architectures"] = {a: r._summary() for a, r in self.by_architecture.items()}
        return found

    def _summary(self) -> dict:
        return {"test_accuracies": self.test_accuracies, "val_accuracies": self.val_accuracies,
                "lr": self.lr, "mean": self.mean, "std": self.std, "val_mean": self.val_mean}

    def __str__(self) -> str:
        nets = f"over {len(self.test_accuracies)} nets"
        if not self.per_architecture:
            return f"{100 * self.mean:.2f} ± {100 * self.std:.2f} % {nets}"
        return ", ".join(f"{a} {100 * r.mean:.2f} ± {100 * r.std:.2f} %"
                         for a, r in self.by_architecture.items()) + f" {nets} each"


def network_metrics(network: NetResult, models: Sequence[str]) -> dict[str, float]:
    """One finished network's accuracies (%) under the names `EvalResult.metrics` gives them
    in an evaluation of `models`: what a caller can log while the evaluation still runs."""
    own = {net_metric("test", network.index): _percent(network.test_accuracy)}
    if network.val_accuracy is not None:
        own[net_metric("val", network.index)] = _percent(network.val_accuracy)
    found = dict(own) if network.architecture == models[0] else {}
    if list(models) != [DEFAULT_ARCHITECTURE]:  # as `EvalResult.per_architecture`
        found |= {arch_metric(network.architecture, k): v for k, v in own.items()}
    return found


class Evaluator:
    """Built once from config; `evaluate` trains `num_nets` networks of every architecture of
    `config.models` on the given set. "convnet" is the ConvNet of `model`. `run_seed`: the
    seed of the run whose set is evaluated (`network_seed`)."""

    def __init__(
        self, config: EvalConfig, model: ModelConfig, data: RealData, dsa_strategy: str,
        device: torch.device | str = "cpu", compile: bool = False, run_seed: int = 0,
    ):
        self.config = config
        self.seeds = network_seeds(config, run_seed)
        self._on_device: dict[str, Split] = {}  # real splits moved to `device` (`_split`)
        self.forward = MaybeCompiled(forward, compile)  # a single network's forward pass
        self.model_config = model
        self.data = data
        self.device = torch.device(device)
        keep_freed_memory()
        self.dsa = DSA(dsa_strategy if config.dsa else "none", drop_flip=data.info.is_digits)
        # Built without weights, now: an architecture that cannot take these images fails
        # here (naming itself), not after the networks before it have trained.
        with torch.device("meta"):
            self.batch_norm = {arch: uses_batch_norm(self._network(arch)) for arch in config.models}

    def _network(self, arch: str, seed: int | None = None) -> torch.nn.Module:
        info = self.data.info
        return build_network(arch, info.channels, info.image_size, info.num_classes,
                             self.model_config, seed)

    def evaluate(
        self, images: torch.Tensor, labels: torch.Tensor, lr: float | torch.Tensor | None = None,
        parallel: bool | None = None, done: Iterable[NetResult] = (),
        on_network: Callable[[NetResult], None] | None = None,
        on_epoch: Callable[[NetEpoch], None] | None = None,
    ) -> EvalResult:
        """Train every network from its own seed; `lr` (a learned step size) overrides config.

        `done`: networks an earlier, stopped evaluation of the same set finished; they are not
        trained again, and the result equals an uninterrupted evaluation's. `on_network` is
        called with each network this call finishes, in order, so that a caller can save it;
        `on_epoch` with each network's every epoch (its loss costs one host read per epoch).
        """
        lr = float(lr) if lr is not None else self.config.lr
        if parallel is None:
            parallel = self.config.parallel
        if parallel is None:
            parallel = self.device.type == "cuda"
        finished = self._check_done(done)
        images, labels = images.detach().to(self.device), labels.to(self.device)
        for arch in self.config.models:
            todo = [i for i in range(self.config.num_nets) if (arch, i) not in finished]
            together = parallel and not self.batch_norm[arch] and todo
            for group in [todo] if together else [[i] for i in todo]:
                seeds = [self.seeds[i] for i in group]
                ensemble = self._train(arch, seeds, images, labels, lr, on_epoch, group)
                test = self._accuracy(ensemble, "test")
                val = (self._accuracy(ensemble, "val") if len(self.data.val)
                       else [None] * len(group))
                for index, seed, test_acc, val_acc in zip(group, seeds, test, val, strict=True):
                    finished[arch, index] = net = NetResult(arch, index, seed, test_acc, val_acc)
                    if on_network is not None:
                        on_network(net)
        return EvalResult.from_networks(self.config.models, finished.values(), lr)

    def _check_done(self, done: Iterable[NetResult]) -> dict[tuple[str, int], NetResult]:
        """Finished networks by (architecture, index); one of another evaluation is an error."""
        config, finished = self.config, {}
        for net in done:
            if (net.architecture not in config.models or not 0 <= net.index < config.num_nets
                    or net.seed != self.seeds[net.index]):
                raise ValueError(
                    f"finished network {net} is not one of this evaluation's ({config.models}, "
                    f"{config.num_nets} each, seeds {self.seeds})"
                )
            finished[net.architecture, net.index] = net
        return finished

    def _train(self, arch: str, seeds: list[int], images: torch.Tensor, labels: torch.Tensor,
               lr: float, on_epoch: Callable[[NetEpoch], None] | None = None,
               indices: Sequence[int] = ()) -> _Ensemble:
        """The networks of `seeds` (networks `indices` of `arch`, for `on_epoch`), trained."""
        config = self.config
        ensemble = _Ensemble([self._network(arch, s) for s in seeds], self.device, self.forward)
        ensemble.train(True)
        optimizer = torch.optim.SGD(
            ensemble.params, lr=lr, momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        decay_at = int(config.epochs * config.lr_decay_epoch_fraction)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [decay_at], gamma=0.1)
        # Each network shuffles and augments with its own generator, as if trained alone.
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        n, batch = len(labels), min(config.batch_size, len(labels))
        for epoch in range(config.epochs):
            orders = torch.stack([torch.randperm(n, generator=g) for g in generators])
            epoch_loss = torch.zeros(len(seeds), device=self.device)
            for start in range(0, n, batch):
                index = orders[:, start : start + batch].to(self.device)  # nets x batch
                x = torch.stack(
                    [self.dsa(images[idx], g) for idx, g in zip(index, generators, strict=True)]
                )
                logits = ensemble(x)
                # Summing the per-network losses keeps each network's gradient its own.
                losses = F.cross_entropy(logits.flatten(0, 1), labels[index].flatten(),
                                         reduction="none").view(len(seeds), -1).mean(1)
                optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()
                optimizer.step()
                epoch_loss += losses.detach()  # summed on the device: no host read per step
            schedule.step()
            if on_epoch is not None:
                means = (epoch_loss / -(-n // batch)).tolist()  # over the epoch's batches
                for i, loss in zip(indices, means, strict=True):
                    on_epoch(NetEpoch(arch, i, epoch + 1, config.epochs, loss))
        return ensemble

    def _split(self, name: str) -> Split:
        """The real split `name` ("test", "val") on the evaluation's device: moved there once,
        not once per network."""
        if name not in self._on_device:
            split = getattr(self.data, name)
            self._on_device[name] = Split(split.images.to(self.device),
                                          split.labels.to(self.device))
        return self._on_device[name]

    @torch.no_grad()
    def _accuracy(self, ensemble: _Ensemble, name: str) -> list[float]:
        split, layout = self._split(name), memory_format(self.device)
        ensemble.for_testing(layout)
        correct = torch.zeros(ensemble.size, dtype=torch.long, device=self.device)
        batches = zip(split.images.split(TEST_BATCH), split.labels.split(TEST_BATCH), strict=True)
        for images, labels in batches:
            logits = ensemble.shared(images.contiguous(memory_format=layout))
            correct += (logits.argmax(-1) == labels).sum(1)
        return [count / len(split) for count in correct.tolist()]  # exact fractions


class _Ensemble:
    """N networks of one architecture trained side by side; each call takes one batch per net.

    Several networks are stacked and called through vmap. A single network stays a plain
    module: vmap around one network measured 1.2x slower per training step on CPU (its
    convolution backward takes a generic path), so groups of one never pay for it. vmap
    cannot update batch norm's running statistics in place: batch-norm networks come alone.
    """

    def __init__(
        self, nets: list[torch.nn.Module], device: torch.device,
        forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = forward,
    ):
        self.forward = forward
        if len(nets) > 1 and uses_batch_norm(nets[0]):
            raise ValueError("batch-norm networks train one at a time")
        self.size = len(nets)
        if self.size == 1:
            self.net = nets[0].to(device)
            self.params = list(self.net.parameters())
            return
        params, self.buffers = stack_module_state([net.to(device) for net in nets])
        stacked = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.stacked = stacked
        self.params = list(stacked.values())
        self.skeleton = copy.deepcopy(nets[0]).to("meta")

    def train(self, mode: bool) -> None:
        (self.net if self.size == 1 else self.skeleton).train(mode)

    def for_testing(self, layout: torch.memory_format) -> None:
        """Eval mode (batch norm: the running statistics of training); a single network's
        weights also move to `layout`: channels-last inference measured 1.2x faster on CPU."""
        self.train(False)
        if self.size == 1:
            self.net.to(memory_format=layout)

    def _call(self, params, buffers, x):
        return functional_call(self.skeleton, (params, buffers), (x,))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: nets x batch x C x H x W, one batch per network."""
        if self.size == 1:
            return self.forward(self.net, x[0]).unsqueeze(0)
        return vmap(self._call)(self.stacked, self.buffers, x)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """One batch seen by every network: nets x batch x classes.

        A loop, not vmap: broadcasting one input through vmap measured ~1.7x slower on CPU.
        """
        if self.size == 1:
            return self.forward(self.net, x).unsqueeze(0)
        return torch.stack([
            self._call({k: v[i] for k, v in self.stacked.items()},
                       {k: v[i] for k, v in self.buffers.items()}, x)
            for i in range(self.size)
        ])
