import pytest
import torch

from mim4dd.config import ModelConfig
from mim4dd.models import block_shapes, build_model


@pytest.mark.parametrize(
    "channels,size,expected",
    [(1, 28, [(128, 16, 16), (128, 8, 8), (128, 4, 4)]),  # padding 3: 28 -> 32 -> 16 -> 8 -> 4
     (3, 32, [(128, 16, 16), (128, 8, 8), (128, 4, 4)]),
     (1, 8, [(128, 4, 4), (128, 2, 2), (128, 1, 1)])],
)
def test_convnet_shapes(channels, size, expected):
    net = build_model(channels, size, 10, ModelConfig())
    x = torch.randn(2, channels, size, size)
    maps = net.block_features(x)
    assert [tuple(m.shape[1:]) for m in maps] == expected
    assert block_shapes(channels, size, ModelConfig()) == expected
    assert net.embed(x).shape == ((2, 128 * 16) if size != 8 else (2, 128))
    assert net(x).shape == (2, 10)
    assert torch.equal(net.embed(x), maps[-1].flatten(1))


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_convnet_variants(norm, pooling):
    net = build_model(3, 32, 100, ModelConfig(width=16, depth=4, norm=norm, pooling=pooling))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_model(1, 28, 10, ModelConfig(width=8), seed=4)
    b = build_model(1, 28, 10, ModelConfig(width=8), seed=4)
    c = build_model(1, 28, 10, ModelConfig(width=8), seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_too_deep_for_the_image_is_an_error():
    with pytest.raises(ValueError, match="too deep"):
        build_model(1, 8, 10, ModelConfig(depth=4))
