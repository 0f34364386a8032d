"""The evaluation pool: every architecture builds and trains on MNIST- and CIFAR-shaped input."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from mim4dd.config import EvalConfig, ModelConfig
from mim4dd.models import build_model
from mim4dd.zoo import ARCHITECTURES, build_network, check_fits, uses_batch_norm

SMALL_CONVNET = ModelConfig(width=8)  # only the ConvNet has a width to shrink


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_builds_and_trains_a_step(name, channels, size):
    net = build_network(name, channels, size, 10, SMALL_CONVNET, seed=0)
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, 7])
    before = [p.detach().clone() for p in net.parameters()]
    logits = net(x)
    assert logits.shape == (2, 10)
    loss = F.cross_entropy(logits, y)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    loss.backward()
    optimizer.step()
    after = list(net.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_seeded_networks_are_reproducible_and_convnet_is_the_distillation_model():
    a = build_network("resnet18", 3, 32, 10, ModelConfig(), seed=3)
    b = build_network("resnet18", 3, 32, 10, ModelConfig(), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    convnet = build_network("convnet", 1, 28, 10, SMALL_CONVNET, seed=5)
    same = build_model(1, 28, 10, SMALL_CONVNET, seed=5)
    assert convnet.state_dict().keys() == same.state_dict().keys()
    assert all(torch.equal(convnet.state_dict()[k], v) for k, v in same.state_dict().items())


def test_batch_norm_variants_are_the_bn_entries():
    with torch.device("meta"):
        assert {name for name in ARCHITECTURES
                if uses_batch_norm(build_network(name, 3, 32, 10, ModelConfig()))} == {"vgg11_bn", "resnet18_bn"}
        assert uses_batch_norm(build_network("convnet", 3, 32, 10, ModelConfig(norm="batch")))


def test_unknown_or_unfit_architectures_are_clear_errors():
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'.*allowed: convnet"):
        build_network("vgg16", 3, 32, 10, ModelConfig())
    with pytest.raises(ValueError, match="lenet: cannot take 1x8x8 images"):
        check_fits("lenet", 1, 8, ModelConfig())
    with pytest.raises(ValueError, match="resnet18: cannot take 1x8x8 images: an instance norm"):
        check_fits("resnet18", 1, 8, ModelConfig())  # its last block would normalise single values
    check_fits("resnet18_bn", 1, 8, ModelConfig())  # batch norm normalises over the batch: it fits


def test_eval_models_are_validated_against_the_registry():
    assert EvalConfig().models == ["convnet"]
    assert EvalConfig(models=["resnet18", "convnet"]).models == ["resnet18", "convnet"]
    assert EvalConfig(models="convnet, mlp").models == ["convnet", "mlp"]  # as --set gives it
    with pytest.raises(ValidationError, match="allowed: convnet, mlp, lenet"):
        EvalConfig(models=["resnet"])
    with pytest.raises(ValidationError, match="lists mlp more than once"):
        EvalConfig(models=["mlp", "convnet", "mlp"])
    with pytest.raises(ValidationError, match="at least one"):
        EvalConfig(models=[])
