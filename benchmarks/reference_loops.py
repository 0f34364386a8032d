"""Baselines for bench_speed.py: the DM step and one evaluation network written the way the
reference DC/DSA/DM code describes them, on our building blocks (ConvNet, DSA, data).

* DM step: a fresh random ConvNet; then class by class, `batch_real` real images of the class
  and its IPC synthetic images, one DSA draw shared by both, the real batch embedded without
  gradient and the synthetic one with it, the squared distance of the two mean embeddings
  summed over classes; one SGD step on the images.
* Evaluation network: a plain loop over shuffled mini-batches (DSA per batch, cross-entropy,
  SGD with momentum and weight decay, lr x0.1 at half time), then a pass over the test (and
  validation) split in batches of 256.

Same work as the engine per step (same network, same image counts, same augmentation), so the
ratio engine / baseline measures how the engine does it, nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mim4dd.augment import DSA
from mim4dd.config import Config, EvalConfig, ModelConfig
from mim4dd.data import RealData, Split
from mim4dd.models import build_model


class ReferenceDM:
    def __init__(self, config: Config, data: RealData, images: torch.Tensor):
        self.config, self.data = config, data
        self.images = images.detach().clone().requires_grad_(True)
        self.optimizer = torch.optim.SGD([self.images], lr=config.lr_img, momentum=0.5)
        self.dsa = DSA(config.dsa_strategy, drop_flip=data.info.is_digits)
        labels = data.train.labels
        self.by_class = [torch.nonzero(labels == c).flatten() for c in range(data.info.num_classes)]
        self.generator = torch.Generator().manual_seed(config.seed)
        self.iteration = 0

    def step(self) -> None:
        info, ipc = self.data.info, self.config.ipc
        net = build_model(info.channels, info.image_size, info.num_classes, self.config.model,
                          seed=self.iteration)
        net.requires_grad_(False)
        loss = torch.zeros(())
        for c, indices in enumerate(self.by_class):
            pick = indices[torch.randperm(len(indices), generator=self.generator)]
            real = self.data.train.images[pick[: self.config.batch_real]]
            syn = self.images[c * ipc : (c + 1) * ipc]
            params = self.dsa.sample(1, self.generator)
            real = self.dsa.apply(real, params, torch.zeros(len(real), dtype=torch.long))
            syn = self.dsa.apply(syn, params, torch.zeros(len(syn), dtype=torch.long))
            with torch.no_grad():
                real_mean = net.embed(real).mean(0)
            loss = loss + ((real_mean - net.embed(syn).mean(0)) ** 2).sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.iteration += 1


def reference_evaluate(
    images: torch.Tensor, labels: torch.Tensor, data: RealData, config: EvalConfig,
    model: ModelConfig, dsa_strategy: str, seed: int,
) -> tuple[float, float]:
    """Train one network on (images, labels); its (test, validation) accuracy."""
    info = data.info
    net = build_model(info.channels, info.image_size, info.num_classes, model, seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    decay_at = int(config.epochs * config.lr_decay_epoch_fraction)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [decay_at], gamma=0.1)
    dsa = DSA(dsa_strategy if config.dsa else "none", drop_flip=info.is_digits)
    generator = torch.Generator().manual_seed(seed)
    for _epoch in range(config.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(config.batch_size):
            loss = F.cross_entropy(net(dsa(images[batch], generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    return _accuracy(net, data.test), _accuracy(net, data.val)


@torch.no_grad()
def _accuracy(net: torch.nn.Module, split: Split) -> float:
    correct = 0
    for images, labels in zip(split.images.split(256), split.labels.split(256), strict=True):
        correct += int((net(images).argmax(1) == labels).sum())
    return correct / max(len(split), 1)
