"""The evaluation pool: the networks the dataset-distillation literature trains on a distilled
set to measure how well it transfers beyond the architecture it was distilled with.

The forms are those of the DC/DSA/DM/MTT reference code, for 28x28 and 32x32 inputs of any
channel count: instance norm (GroupNorm(C, C)) by default with `_bn` batch-norm variants,
small-image stems (ResNet-18's first conv is 3x3 stride 1 with no max-pool), and 28x28 inputs
padded by 2 more on the first conv so that they follow the 32x32 path, as the ConvNet does.
ResNet-18 ends in a global average pool (the reference's 4x4 pool on its 4x4 map). Smaller
images (the 8x8 digits) fit convnet, mlp, alexnet and resnet18_bn; the others say so when an
image is too small for them, including when it would leave an instance norm a 1x1 map, whose
output no longer depends on the input.

`ARCHITECTURES` is the one registry: adding an architecture is one entry. Every builder takes
(channels, image_size, num_classes, ModelConfig); only "convnet" reads the ModelConfig (its
width, depth, norm and pooling), the others have the literature's fixed widths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from mim4dd.models import ConvNet, norm_layer, seeded

if TYPE_CHECKING:  # config validates eval.models against this registry: no import back
    from mim4dd.config import ModelConfig

DEFAULT_ARCHITECTURE = "convnet"  # the distillation's own network; the default evaluation


def _stem_padding(image_size: int) -> int:
    """Extra padding of the first conv: 28x28 inputs then follow the 32x32 path."""
    return 2 if image_size == 28 else 0


def _refuse_single_values(norm: nn.GroupNorm, inputs: tuple[torch.Tensor]) -> None:
    if inputs[0][0].numel() // norm.num_groups < 2:
        raise ValueError("an instance norm would see a 1x1 map: a constant, whatever the image")


class FeatureClassifier(nn.Module):
    """features -> flatten -> MLP classifier: the shape of every pool network but the ConvNet.

    The classifier's input size is found by passing a shapeless (meta) probe through the
    features, so one definition serves every image size the features accept.
    """

    def __init__(
        self, make_features: Callable[[], nn.Module], channels: int, image_size: int,
        hidden: list[int], num_classes: int,
    ):
        super().__init__()
        try:  # a batch of 2: batch norm in train mode refuses a single 1x1 sample
            with torch.device("meta"):
                features = make_features()
                for module in features.modules():
                    if isinstance(module, nn.GroupNorm):
                        module.register_forward_pre_hook(_refuse_single_values)
                probe = features(torch.empty(2, channels, image_size, image_size))
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"cannot take {channels}x{image_size}x{image_size} images: "
                             f"{exc}") from None
        self.features = make_features()
        widths = [probe[0].numel(), *hidden, num_classes]
        layers: list[nn.Module] = []
        for width_in, width_out in pairwise(widths):
            layers += [nn.Linear(width_in, width_out), nn.ReLU(inplace=True)]
        self.classifier = nn.Sequential(*layers[:-1])  # no ReLU on the logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def mlp(channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Two hidden layers of 128 on the raw pixels."""
    return FeatureClassifier(nn.Identity, channels, image_size, [128, 128], num_classes)


def lenet(channels: int, image_size: int, num_classes: int) -> nn.Module:
    """LeNet-5 with ReLU and max-pool: conv 6 -> conv 16 (5x5), then 120 -> 84."""
    def features() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=_stem_padding(image_size)), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
    return FeatureClassifier(features, channels, image_size, [120, 84], num_classes)


def alexnet(channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The DD literature's small-image AlexNet: five convs (128-192-256-192-192), no norm."""
    def features() -> nn.Module:
        def conv(width_in: int, width: int, kernel: int, padding: int) -> list[nn.Module]:
            return [nn.Conv2d(width_in, width, kernel, padding=padding), nn.ReLU(inplace=True)]
        return nn.Sequential(
            *conv(channels, 128, 5, 2 + _stem_padding(image_size)), nn.MaxPool2d(2),
            *conv(128, 192, 5, 2), nn.MaxPool2d(2),
            *conv(192, 256, 3, 1), *conv(256, 192, 3, 1), *conv(192, 192, 3, 1), nn.MaxPool2d(2),
        )
    return FeatureClassifier(features, channels, image_size, [], num_classes)


VGG11_LAYERS = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def vgg11(channels: int, image_size: int, num_classes: int, norm: str) -> nn.Module:
    """VGG-11 with a normalisation after every conv and a single linear classifier."""
    def features() -> nn.Module:
        layers: list[nn.Module] = []
        width_in, padding = channels, 1 + _stem_padding(image_size)
        for item in VGG11_LAYERS:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(width_in, item, 3, padding=padding), norm_layer(norm, item),
                       nn.ReLU(inplace=True)]
            width_in, padding = item, 1
        return nn.Sequential(*layers)
    return FeatureClassifier(features, channels, image_size, [], num_classes)


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convs with an identity (or 1x1 projection) shortcut."""

    def __init__(self, width_in: int, width: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width, 3, stride, 1, bias=False)
        self.norm1 = norm_layer(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.norm2 = norm_layer(norm, width)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or width_in != width:
            self.shortcut = nn.Sequential(nn.Conv2d(width_in, width, 1, stride, bias=False),
                                          norm_layer(norm, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))  # not in place: vmap-safe


def resnet18(channels: int, image_size: int, num_classes: int, norm: str) -> nn.Module:
    """ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool), widths 64..512."""
    def features() -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False),
                                   norm_layer(norm, 64), nn.ReLU(inplace=True)]
        width_in = 64
        for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(width_in, width, stride, norm), BasicBlock(width, width, 1, norm)]
            width_in = width
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
    return FeatureClassifier(features, channels, image_size, [], num_classes)


Builder = Callable[[int, int, int, "ModelConfig"], nn.Module]

ARCHITECTURES: dict[str, Builder] = {
    "convnet": lambda c, size, n, model: ConvNet(c, size, n, model),
    "mlp": lambda c, size, n, model: mlp(c, size, n),
    "lenet": lambda c, size, n, model: lenet(c, size, n),
    "alexnet": lambda c, size, n, model: alexnet(c, size, n),
    "vgg11": lambda c, size, n, model: vgg11(c, size, n, "instance"),
    "vgg11_bn": lambda c, size, n, model: vgg11(c, size, n, "batch"),
    "resnet18": lambda c, size, n, model: resnet18(c, size, n, "instance"),
    "resnet18_bn": lambda c, size, n, model: resnet18(c, size, n, "batch"),
}


def unknown_architecture_message(name: str) -> str:
    return f"unknown architecture {name!r} (allowed: {', '.join(ARCHITECTURES)})"


def build_network(
    name: str, channels: int, image_size: int, num_classes: int,
    model: ModelConfig, seed: int | None = None,
) -> nn.Module:
    """A fresh pool network; with `seed`, its initial weights depend on the seed alone.
    "convnet" is exactly `build_model(..., model, seed)`."""
    if name not in ARCHITECTURES:
        raise ValueError(unknown_architecture_message(name))
    make = ARCHITECTURES[name]
    try:
        return seeded(seed, lambda: make(channels, image_size, num_classes, model))
    except ValueError as exc:  # the images do not fit: say which network refused them
        raise ValueError(f"{name}: {exc}") from None


def check_fits(name: str, channels: int, image_size: int, model: ModelConfig) -> None:
    """Raise ValueError, naming the architecture, when it cannot take such images (costs no
    weights: built on the meta device)."""
    with torch.device("meta"):
        build_network(name, channels, image_size, 2, model)


def uses_batch_norm(net: nn.Module) -> bool:
    """Batch-norm networks keep running statistics: they train in train mode, test in eval mode,
    and are never stacked under vmap (which cannot update those statistics in place)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


__all__ = ["ARCHITECTURES", "DEFAULT_ARCHITECTURE", "build_network", "check_fits",
           "unknown_architecture_message", "uses_batch_norm"]
