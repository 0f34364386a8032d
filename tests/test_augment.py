import math

import pytest
import torch

from mim4dd.augment import DEFAULT_STRATEGY, DSA, OPS, AugmentParams, validate_strategy


def images(n=6, c=3, size=16, seed=0):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_validate_strategy_accepts_default_and_none():
    assert validate_strategy(DEFAULT_STRATEGY) == DEFAULT_STRATEGY
    assert validate_strategy("flip_crop") == "flip_crop"
    for text in ("none", "None", "NONE", ""):
        assert validate_strategy(text) == "none"


def test_validate_strategy_rejects_unknown_and_repeated_ops():
    with pytest.raises(ValueError) as err:
        validate_strategy("color_foo")
    assert "['foo']" in str(err.value)
    assert "allowed ops: " + ", ".join(OPS) in str(err.value)
    with pytest.raises(ValueError, match="repeated"):
        validate_strategy("flip_flip")


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="mode"):
        DSA(mode="sometimes")


@pytest.mark.parametrize("mode", ["single", "all"])
def test_same_seed_same_output_different_seed_different(mode):
    x = images()
    dsa = DSA(mode=mode)
    assert torch.equal(dsa(x, gen(0)), dsa(x, gen(0)))
    assert not torch.allclose(dsa(x, gen(0)), dsa(x, gen(1)))


def test_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    DSA(mode="all")(images(), gen(0))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("mode", ["single", "all"])
def test_siamese_groups_share_transform(mode):
    dsa = DSA(mode=mode)
    params = dsa.sample(3, gen(4))
    x = images(4)
    groups = torch.tensor([0, 1, 2, 0])
    out = dsa.apply(x, params, groups=groups)
    # Another batch: same images reordered and partly duplicated, with matching groups.
    order = torch.tensor([3, 0, 2, 1, 1])
    out2 = dsa.apply(x[order], params, groups=groups[order])
    torch.testing.assert_close(out2, out[order])
    # Same image under different groups is transformed differently.
    same = x[:1].expand(3, -1, -1, -1)
    by_group = dsa.apply(same, params, groups=torch.arange(3))
    assert not torch.allclose(by_group[0], by_group[1])


def test_groups_none_needs_one_row_per_sample():
    dsa = DSA()
    with pytest.raises(ValueError, match="rows"):
        dsa.apply(images(4), dsa.sample(3, gen()))


@pytest.mark.parametrize("mode", ["single", "all"])
def test_gradient_reaches_images(mode):
    x = images().requires_grad_(True)
    out = DSA(mode=mode)(x, gen(2))
    (out**2).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def test_none_is_identity():
    x = images()
    for dsa in (DSA("none"), DSA(""), DSA("flip", drop_flip=True)):
        assert not dsa.enabled
        assert dsa.strategy == "none"
        assert dsa(x, gen()) is x


def test_drop_flip_removes_flip():
    dsa = DSA(drop_flip=True, mode="all")
    assert dsa.enabled and "flip" not in dsa.ops
    assert dsa.strategy == "color_crop_cutout_scale_rotate"
    assert not dsa.sample(200, gen()).flip.any()
    assert DSA(mode="all").sample(200, gen()).flip.any()


def test_sampled_ranges_all_mode():
    p = DSA(mode="all").sample(2000, gen(7))
    assert ((p.brightness >= -0.5) & (p.brightness < 0.5)).all()
    assert ((p.saturation >= 0) & (p.saturation < 2)).all()
    assert ((p.contrast >= 0.5) & (p.contrast < 1.5)).all()
    assert ((p.scale >= 1 / 1.2 - 1e-6) & (p.scale <= 1.2 + 1e-6)).all()
    assert (p.angle.abs() <= math.radians(15) + 1e-6).all()
    assert p.cutout.all()
    assert 0.4 < p.flip.float().mean() < 0.6


def test_single_mode_uses_at_most_one_op_per_group():
    p = DSA(mode="single").sample(600, gen(3))
    active = torch.stack(
        [
            (p.brightness != 0) | (p.saturation != 1) | (p.contrast != 1),
            (p.crop != 0.5).any(1),
            p.cutout,
            p.flip,
            (p.scale != 1).any(1),
            p.angle != 0,
        ]
    )
    assert (active.sum(0) <= 1).all()
    assert active.any(1).all()  # every op of the strategy gets chosen by some group


def test_forced_flip_mirrors_exactly():
    dsa = DSA("flip")
    x = images(2).double()  # float64 so that "exact" can be checked tightly
    params = AugmentParams.identity(2)
    params.flip = torch.tensor([True, False])
    out = dsa.apply(x, params)
    torch.testing.assert_close(out[0], torch.flip(x[0], dims=[-1]), atol=1e-12, rtol=0)
    torch.testing.assert_close(out[1], x[1], atol=1e-12, rtol=0)
    out32 = dsa.apply(x.float(), params)  # float32 grid rounding stays far below a pixel step
    torch.testing.assert_close(out32, out.float(), atol=1e-5, rtol=0)


def crop_u(shift, size):
    """The crop draw that gives an integer shift (max shift m = round(0.125 * size))."""
    m = int(0.125 * size + 0.5)
    return (shift + m + 0.5) / (2 * m + 1)


def test_crop_moves_pixels_by_integer_shift():
    size, dx, dy = 28, 3, -2
    x = images(1, 1, size).double()
    params = AugmentParams.identity(1)
    params.crop = torch.tensor([[crop_u(dx, size), crop_u(dy, size)]])
    out = DSA("crop").apply(x, params)
    expected = torch.zeros_like(x)
    expected[..., : size + dy, dx:] = x[..., -dy:, : size - dx]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_sampled_crops_are_integer_shifts_within_range():
    size, m = 8, 1
    x = images(20, 1, size)
    out = DSA("crop")(x, gen(5))
    padded = torch.nn.functional.pad(x, (m, m, m, m))
    candidates = torch.stack(
        [padded[..., m - dy : m - dy + size, m - dx : m - dx + size]
         for dy in range(-m, m + 1) for dx in range(-m, m + 1)]
    )  # (9, N, 1, 8, 8): every allowed shift of every image
    error = (candidates - out).abs().amax(dim=(2, 3, 4))
    assert (error.min(0).values < 1e-5).all()
    assert len(set(error.argmin(0).tolist())) > 1


def test_cutout_zeroes_square_clipped_at_border():
    x = images(2, 1, 8) + 10  # no pixel is zero by chance
    params = AugmentParams.identity(2)
    params.cutout = torch.tensor([True, True])
    params.cutout_centre = torch.tensor([[0.5, 0.5], [0.0, 0.99]])
    out = DSA("cutout").apply(x, params)
    zero = out == 0
    # Side 4 around centre (4, 4): rows/cols 2..5.
    assert zero[0, 0, 2:6, 2:6].all() and zero[0].sum() == 16
    # Centre (x=0, y=8): clipped to cols 0..1, rows 6..7.
    assert zero[1, 0, 6:, :2].all() and zero[1].sum() == 4
    assert torch.equal(out[~zero], x[~zero])


def test_color_brightness_and_contrast():
    x = images(1)
    params = AugmentParams.identity(1)
    params.brightness = torch.tensor([0.3])
    torch.testing.assert_close(DSA("color").apply(x, params), x + 0.3)
    params = AugmentParams.identity(1)
    params.contrast = torch.tensor([0.5])
    out = DSA("color").apply(x, params)
    torch.testing.assert_close(out - out.mean(), 0.5 * (x - x.mean()))


def test_ops_outside_strategy_are_ignored():
    x = images(1)
    params = AugmentParams.identity(1)
    params.flip = torch.tensor([True])
    torch.testing.assert_close(DSA("crop").apply(x, params), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("mode", ["single", "all"])
def test_shapes_preserved(shape, mode):
    x = torch.randn(5, *shape, generator=gen())
    out = DSA(mode=mode)(x, gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
