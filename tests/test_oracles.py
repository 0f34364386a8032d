"""Oracles: every loss and augmentation recomputed on a tiny input straight from its equation in
docs/method.md, in float64, and compared with the code within a tight tolerance.

The module under test gives only the value compared and, where the equation needs them, shared
inputs: a network's initial weights and a DSA parameter draw, which the oracle applies itself.
The oracles' arithmetic is numpy, or plain torch where a network's forward (F.conv2d) or a
gradient (autograd on the hand-written forward) is needed.
"""

import itertools
from dataclasses import fields, replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mim4dd.augment import DEFAULT_STRATEGY, DSA, AugmentParams
from mim4dd.config import Config, ModelConfig
from mim4dd.flat import FlatParams
from mim4dd.models import build_model
from mim4dd.objectives import cafe, distribution
from mim4dd.objectives.base import StepBatch
from mim4dd.objectives.cafe import CAFE, cafe_loss, layer_weights
from mim4dd.objectives.distribution import DistributionMatching
from mim4dd.objectives.gradient import GradientMatching
from mim4dd.objectives.mim import MIMTerm, pool_to_grid
from mim4dd.objectives.trajectory import normalised_distance, unroll

CLASSES, CHANNELS, SIZE, REAL_PER_CLASS, IPC = 3, 3, 8, 4, 2
WIDTH, DEPTH = 4, 2
NORM_EPS = 1e-5  # nn.GroupNorm's default, which the ConvNet's instance norm keeps
COSINE_EPS = 1e-6  # docs/method.md: 1 - <a, b> / (|a| |b| + 1e-6)
CAFE_BETA = 0.01
TIGHT = {"rel": 1e-9}  # float64 throughout: only summation order differs


@pytest.fixture(autouse=True)
def float64_by_default():
    """Networks, DSA draws and heads built inside the code under test are float64 too."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# --- the augmentation, by hand -----------------------------------------------------------------

IDENTITY = {  # parameter values that leave an image unchanged (AugmentParams' docstring)
    "brightness": 0.0, "saturation": 1.0, "contrast": 1.0, "crop": 0.5, "flip": False,
    "scale": 1.0, "angle": 0.0, "cutout": False, "cutout_centre": 0.5,
}


def half_up(value: float) -> int:
    return int(value + 0.5)


def only(params: AugmentParams, kept: tuple[str, ...]) -> AugmentParams:
    """`params` with every field outside `kept` set to its identity value."""
    return replace(params, **{
        f.name: torch.full_like(getattr(params, f.name), IDENTITY[f.name])
        for f in fields(params) if f.name not in kept
    })


def rows_of(params: AugmentParams, groups: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """One numpy row of parameters per sample (sample i reads row groups[i])."""
    index = slice(None) if groups is None else groups.numpy()
    return {f.name: getattr(params, f.name).detach().numpy()[index] for f in fields(params)}


def colour_by_hand(x: np.ndarray, p: dict) -> np.ndarray:
    """Brightness adds b; saturation scales each pixel's deviation from its mean over channels
    by s; contrast scales the deviation from the image's mean by k (in that order, as the
    reference DSA)."""
    def per_sample(v):
        return v[:, None, None, None]

    x = x + per_sample(p["brightness"])
    pixel_mean = x.mean(axis=1, keepdims=True)
    x = pixel_mean + per_sample(p["saturation"]) * (x - pixel_mean)
    image_mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return image_mean + per_sample(p["contrast"]) * (x - image_mean)


def crop_shift(u: float, size: int) -> int:
    """Whole-pixel translation in [-m, m], m = round(12.5 % of the size), from u in [0, 1)."""
    m = half_up(0.125 * size)
    return int(np.floor(u * (2 * m + 1))) - m


def source_of_each_pixel(p: dict, n: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(column, row) in the input that output pixel (row, column) of sample n reads, in pixel
    units about the image centre: (u, v) -> (u cos a + v sin a, -u sin a + v cos a) (the docs
    give the range +-15 deg; the sense of rotation is the code's convention), then each axis
    times its scale factor, then mirrored, then translated (the content moves by +shift)."""
    v, u = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    cos, sin = np.cos(p["angle"][n]), np.sin(p["angle"][n])
    u, v = cos * u + sin * v, -sin * u + cos * v
    u, v = p["scale"][n, 0] * u, p["scale"][n, 1] * v
    u = -u if p["flip"][n] else u
    u = u - crop_shift(p["crop"][n, 0], w)
    v = v - crop_shift(p["crop"][n, 1], h)
    return u + (w - 1) / 2, v + (h - 1) / 2


def bilinear(image: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """image (C x H x W) read at real-valued (cols, rows): bilinear, zero outside the image."""
    _, h, w = image.shape
    out = np.zeros((image.shape[0], *cols.shape))
    for di, dj in itertools.product((0, 1), repeat=2):
        i, j = np.floor(rows).astype(int) + di, np.floor(cols).astype(int) + dj
        weight = (1 - np.abs(rows - i)) * (1 - np.abs(cols - j))
        inside = (i >= 0) & (i < h) & (j >= 0) & (j < w)
        out += weight * inside * image[:, i.clip(0, h - 1), j.clip(0, w - 1)]
    return out


def cutout_by_hand(x: np.ndarray, p: dict) -> np.ndarray:
    """Zero a half-size square (side round(size / 2) per axis) whose first index is
    floor(u (size + 1 - side mod 2)) - side // 2, clipped at the border (the reference DSA's
    offsets, clamped into the image)."""
    out = x.copy()
    _, _, h, w = x.shape

    def indices(u: float, size: int) -> np.ndarray:
        side = half_up(0.5 * size)
        start = int(np.floor(u * (size + 1 - side % 2))) - side // 2
        return np.clip(start + np.arange(side), 0, size - 1)

    for n in np.flatnonzero(p["cutout"]):
        rows, cols = indices(p["cutout_centre"][n, 1], h), indices(p["cutout_centre"][n, 0], w)
        out[n][:, rows[:, None], cols[None, :]] = 0
    return out


def augment_by_hand(x: np.ndarray, p: dict) -> np.ndarray:
    """DSA as docs/method.md 'Augmentation' composes it: colour, one resampling (crop, flip,
    scale, rotate), cutout."""
    x = colour_by_hand(x, p)
    _, _, h, w = x.shape
    x = np.stack([bilinear(image, *source_of_each_pixel(p, n, h, w)) for n, image in enumerate(x)])
    return cutout_by_hand(x, p)


def siamese_by_hand(images: torch.Tensor, params: AugmentParams, labels: torch.Tensor):
    """Every image augmented with its class's row of `params`, as a float64 tensor."""
    return torch.from_numpy(augment_by_hand(images.detach().numpy(), rows_of(params, labels)))


# --- the ConvNet, by hand ----------------------------------------------------------------------


def convnet_by_hand(weights: dict[str, torch.Tensor], x: torch.Tensor):
    """Per block (map before pooling, block output), and the logits: each block is conv 3x3
    (padding 1) -> instance norm (per sample and channel, biased variance, affine) -> ReLU ->
    2x2 average pool; the classifier is linear on the flattened last output."""
    maps = []
    for k in itertools.takewhile(lambda k: f"blocks.{k}.0.weight" in weights, itertools.count()):
        x = F.conv2d(x, weights[f"blocks.{k}.0.weight"], weights[f"blocks.{k}.0.bias"], padding=1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        variance = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
        x = (x - mean) / torch.sqrt(variance + NORM_EPS)
        x = x * weights[f"blocks.{k}.1.weight"][:, None, None]
        before_pool = (x + weights[f"blocks.{k}.1.bias"][:, None, None]).clamp_min(0)
        n, c, h, w = before_pool.shape
        x = before_pool.reshape(n, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))
        maps.append((before_pool, x))
    logits = x.flatten(1) @ weights["classifier.weight"].T + weights["classifier.bias"]
    return maps, logits


def cross_entropy_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of log sum_j e^{z_j} - z_y."""
    return (torch.logsumexp(logits, dim=1) - logits[torch.arange(len(labels)), labels]).mean()


def summed_class_mean_gaps(real: np.ndarray, real_labels, syn: np.ndarray, syn_labels) -> float:
    """sum_c || mean_{x in T_c} real_x - mean_{s in S_c} syn_s ||^2 over flattened rows."""
    real, syn = real.reshape(len(real), -1), syn.reshape(len(syn), -1)
    return sum(float(np.sum((real[real_labels == c].mean(0) - syn[syn_labels == c].mean(0)) ** 2))
               for c in range(CLASSES))


# --- a tiny step ---------------------------------------------------------------------------------


def make_objective(cls, base: str, **overrides):
    config = Config.model_validate(dict(
        base=base, dataset="digits", ipc=IPC, lam=0.0, model={"width": WIDTH, "depth": DEPTH},
        dsa_strategy=DEFAULT_STRATEGY, **overrides,
    ))
    info = SimpleNamespace(channels=CHANNELS, image_size=SIZE, num_classes=CLASSES,
                           is_digits=False)
    return cls(config, SimpleNamespace(info=info), torch.device("cpu"))


def network_mid_turn(objective):
    """DC's or CAFE's objective holding a network in the middle of its turn (the steps run at
    iteration 1), so that the step uses it as it is. Set here rather than built by the first
    step: that would build its optimiser, whose first construction in a process imports
    torch._dynamo (seconds)."""
    objective.net = build_model(CHANNELS, SIZE, CLASSES, objective.config.model, seed=11)
    return objective


def step_batch(seed: int = 26) -> StepBatch:
    """A step of CLASSES classes; at seed 26 the classes' DSA draws are scale, rotate, cutout."""
    g = torch.Generator().manual_seed(100 + seed)
    real_labels = torch.arange(CLASSES).repeat_interleave(REAL_PER_CLASS)
    syn_labels = torch.arange(CLASSES).repeat_interleave(IPC)
    return StepBatch(
        real=torch.randn(len(real_labels), CHANNELS, SIZE, SIZE, generator=g),
        real_labels=real_labels,
        syn=torch.randn(len(syn_labels), CHANNELS, SIZE, SIZE, generator=g),
        syn_labels=syn_labels,
        generator=torch.Generator().manual_seed(seed),
        seed=seed,
        iteration=1,
    )


def the_steps_dsa_draw(objective, batch: StepBatch) -> AugmentParams:
    """The per-class DSA draw the step makes first from its generator (a shared input)."""
    return objective.dsa.sample(CLASSES, torch.Generator().manual_seed(batch.seed))


# --- DSA -----------------------------------------------------------------------------------------

OPS = {  # test id -> (strategy, AugmentParams fields it reads)
    "flip": ("flip", ("flip",)),
    "crop": ("crop", ("crop",)),
    "scale": ("scale", ("scale",)),
    "rotate": ("rotate", ("angle",)),
    "brightness": ("color", ("brightness",)),
    "saturation": ("color", ("saturation",)),
    "contrast": ("color", ("contrast",)),
    "colour": ("color", ("brightness", "saturation", "contrast")),
    "cutout": ("cutout", ("cutout", "cutout_centre")),
    "all_composed": (DEFAULT_STRATEGY, tuple(IDENTITY)),
}


@pytest.mark.parametrize("op", OPS)
def test_dsa_op_matches_its_definition(op):
    """Each DSA op, with a fixed draw, equals its definition (docs/method.md 'Augmentation'):
    brightness adds, saturation and contrast scale deviations from a mean, crop translates by
    whole pixels (at most 12.5 % of the size), flip mirrors, scale and rotate resample
    bilinearly with zeros outside, cutout zeroes a half-size square; all composed as colour,
    one resampling, cutout. Non-square 8 x 12 images, so no axis can stand in for the other.
    (The draws' ranges are checked in tests/test_augment.py.)"""
    strategy, kept = OPS[op]
    x = torch.randn(6, CHANNELS, 8, 12, generator=torch.Generator().manual_seed(0))
    params = only(DSA(mode="all").sample(len(x), torch.Generator().manual_seed(3)), kept)
    expected = augment_by_hand(x.numpy(), rows_of(params))
    assert not np.allclose(expected, x.numpy())  # the draw does change the images
    np.testing.assert_allclose(DSA(strategy).apply(x, params).numpy(), expected,
                               rtol=1e-9, atol=1e-12)


# --- the bases' losses ---------------------------------------------------------------------------


def test_dm_loss_is_the_summed_squared_gap_of_class_mean_embeddings(monkeypatch):
    """L_DM = sum_c || mean_{x in T_c} e(A_c(x)) - mean_{s in S_c} e(A_c(s)) ||^2, e the
    flattened last block of the step's fresh network (docs/method.md 'Base: distribution
    matching'). Real images in chunks of 5, so the chunked forward is part of the check."""
    monkeypatch.setattr(distribution, "REAL_CHUNK", 5)
    objective = make_objective(DistributionMatching, "dm")
    batch = step_batch()
    loss = objective.match(batch, with_features=False).base_loss
    net = build_model(CHANNELS, SIZE, CLASSES, objective.config.model, seed=batch.seed)
    weights = dict(net.named_parameters())
    aug = the_steps_dsa_draw(objective, batch)

    def embedding(images, labels):  # the last block's output, flattened
        with torch.no_grad():
            maps, _ = convnet_by_hand(weights, siamese_by_hand(images, aug, labels))
        return maps[-1][1].flatten(1).numpy()

    expected = summed_class_mean_gaps(embedding(batch.real, batch.real_labels),
                                      batch.real_labels.numpy(),
                                      embedding(batch.syn, batch.syn_labels),
                                      batch.syn_labels.numpy())
    assert loss.item() == pytest.approx(expected, **TIGHT)


def gradient_distance_by_hand(g_syn: list[np.ndarray], g_real: list[np.ndarray], metric: str):
    """D of docs/method.md 'Base: gradient matching': `ours` sums 1 - cos over the output rows
    of every parameter of 2+ dimensions; `mse` is the squared distance and `cos` 1 - cos of all
    parameters concatenated (cosines with 1e-6 added to the product of the norms)."""
    def one_minus_cos(a, b, axis=None):
        norms = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
        return 1 - np.sum(a * b, axis=axis) / (norms + COSINE_EPS)

    if metric == "ours":
        return sum(float(one_minus_cos(s.reshape(len(s), -1), r.reshape(len(r), -1), 1).sum())
                   for s, r in zip(g_syn, g_real, strict=True) if s.ndim > 1)
    s = np.concatenate([g.ravel() for g in g_syn])
    r = np.concatenate([g.ravel() for g in g_real])
    return float(np.sum((s - r) ** 2)) if metric == "mse" else float(one_minus_cos(s, r))


@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_dc_loss_sums_the_gradient_distance_of_every_class(metric):
    """L_DC = sum_c D(grad_theta CE(psi(A_c(S_c)), c), grad_theta CE(psi(A_c(T_c)), c))
    (docs/method.md 'Base: gradient matching, DC / DSA')."""
    objective = network_mid_turn(make_objective(GradientMatching, "dc", dis_metric=metric))
    batch = step_batch()
    loss = objective.match(batch, with_features=False).base_loss
    net = objective.net
    aug = the_steps_dsa_draw(objective, batch)

    def class_gradients(images, labels, c):
        x = siamese_by_hand(images, aug, labels)[labels == c]
        _, logits = convnet_by_hand(dict(net.named_parameters()), x)
        grads = torch.autograd.grad(cross_entropy_by_hand(logits, labels[labels == c]),
                                    list(net.parameters()))
        return [g.numpy() for g in grads]

    expected = sum(gradient_distance_by_hand(class_gradients(batch.syn, batch.syn_labels, c),
                                             class_gradients(batch.real, batch.real_labels, c),
                                             metric)
                   for c in range(CLASSES))
    assert loss.item() == pytest.approx(expected, **TIGHT)


def test_mtt_loss_is_the_normalised_distance_after_the_unrolled_student():
    """theta_0 = theta*_t, theta_{n+1} = theta_n - alpha grad_theta CE(f(x_{B_n}; theta_n),
    y_{B_n}) with B_n cycling through fresh permutations, and
    L_MTT = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2
    (docs/method.md 'Base: trajectory matching, MTT'). 6 images in batches of 4: the unroll
    crosses a permutation's short last batch into the next permutation. No DSA here: its
    per-image draws would interleave with the batch order on one generator."""
    net = build_model(CHANNELS, SIZE, CLASSES, ModelConfig(width=WIDTH, depth=DEPTH), seed=0)
    g = torch.Generator().manual_seed(1)
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    target = start + 0.05 * torch.randn(start.shape, generator=g)
    images = torch.randn(6, CHANNELS, SIZE, SIZE, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    alpha, steps, batch_size, seed = torch.tensor(0.3), 3, 4, 7
    student = unroll(FlatParams(net), start, images, labels, alpha, steps, batch_size,
                     torch.Generator().manual_seed(seed))
    loss = normalised_distance(student, start, target)

    names, shapes = zip(*((n, p.shape) for n, p in net.named_parameters()), strict=True)
    sizes = [shape.numel() for shape in shapes]
    order = torch.Generator().manual_seed(seed)  # the batches' draw: a shared input
    batches = itertools.chain.from_iterable(
        torch.randperm(len(labels), generator=order).split(batch_size) for _ in range(steps))
    theta = start.clone().requires_grad_(True)
    for index in itertools.islice(batches, steps):
        weights = {n: part.view(s) for n, part, s in zip(names, theta.split(sizes), shapes,
                                                           strict=True)}
        _, logits = convnet_by_hand(weights, images[index])
        (grad,) = torch.autograd.grad(cross_entropy_by_hand(logits, labels[index]), theta)
        theta = (theta - alpha * grad).detach().requires_grad_(True)
    end, start, target = (v.detach().numpy() for v in (theta, start, target))
    expected = np.sum((end - target) ** 2) / np.sum((start - target) ** 2)
    assert loss.item() == pytest.approx(float(expected), **TIGHT)


def cafe_terms_by_hand(real_layers, real_labels, syn_layers, syn_labels, weights):
    """(L_align, L_disc): L_align = sum_l w_l sum_c ||mean_{T_c} f_l - mean_{S_c} f_l||^2;
    P_c = mean_{s in S_c} e(s), L_disc = sum_{x in T} -log softmax_c(e(x) . P_c)[y_x], e the
    last layer (docs/method.md 'Base: CAFE')."""
    align = sum(w * summed_class_mean_gaps(r, real_labels, s, syn_labels)
                for w, r, s in zip(weights, real_layers, syn_layers, strict=True))
    centres = np.stack([syn_layers[-1][syn_labels == c].mean(0) for c in range(CLASSES)])
    logits = real_layers[-1] @ centres.T
    top = logits.max(1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    return align, float(-log_softmax[np.arange(len(real_labels)), real_labels].sum())


def test_cafe_alignment_and_discrimination_terms():
    """The two CAFE losses on given features, with w = 0.1 for blocks 1..K-1, 1 for block K
    and 2 for the embedding (docs/method.md 'Base: CAFE', 'Layers aligned' and 'Loss')."""
    g = torch.Generator().manual_seed(2)
    real_labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])  # unequal class sizes
    syn_labels = torch.tensor([0, 1, 1, 2])
    widths = [7, 6, 5, 5]  # blocks 1-3 before pooling, then the embedding

    def features(n):
        return [torch.randn(n, d, generator=g) for d in widths]

    real, syn = features(len(real_labels)), features(len(syn_labels))
    real_means = [torch.stack([f[real_labels == c].mean(0) for c in range(CLASSES)])
                  for f in real]
    align, disc = cafe_loss(real_means, real[-1], real_labels, syn, syn_labels, layer_weights(3))
    expected_align, expected_disc = cafe_terms_by_hand(
        [f.numpy() for f in real], real_labels.numpy(), [f.numpy() for f in syn],
        syn_labels.numpy(), [0.1, 0.1, 1.0, 2.0])
    assert align.item() == pytest.approx(expected_align, **TIGHT)
    assert disc.item() == pytest.approx(expected_disc, **TIGHT)


def test_cafe_loss_is_alignment_plus_beta_discrimination_on_the_networks_layers(monkeypatch):
    """L_CAFE = L_align + 0.01 L_disc on the step's network: every block's map after conv ->
    norm -> ReLU and before its pooling, then the embedding, under the class's siamese DSA
    draw (docs/method.md 'Base: CAFE'). Real images in chunks of 5, as for DM."""
    monkeypatch.setattr(cafe, "REAL_CHUNK", 5)
    objective = network_mid_turn(make_objective(CAFE, "cafe"))
    batch = step_batch()
    loss = objective.match(batch, with_features=False).base_loss
    weights = dict(objective.net.named_parameters())
    aug = the_steps_dsa_draw(objective, batch)

    def layers(images, labels):
        with torch.no_grad():
            maps, _ = convnet_by_hand(weights, siamese_by_hand(images, aug, labels))
        flat = [before_pool.flatten(1).numpy() for before_pool, _ in maps]
        return [*flat, maps[-1][1].flatten(1).numpy()]

    align, disc = cafe_terms_by_hand(layers(batch.real, batch.real_labels),
                                     batch.real_labels.numpy(),
                                     layers(batch.syn, batch.syn_labels),
                                     batch.syn_labels.numpy(), [0.1] * (DEPTH - 1) + [1.0, 2.0])
    assert loss.item() == pytest.approx(align + CAFE_BETA * disc, **TIGHT)


# --- the MIM term --------------------------------------------------------------------------------


def test_mim_term_is_the_summed_nce_bound_over_blocks():
    """z = normalize(W_k pool(f_k) + b) per block and side, sigma = z_s . z_r / tau,
    h = e^sigma / (e^sigma + r), r = #negatives / #positives over all (synthetic, real) pairs,
    L_NCE^k = -E_pos[log h] - r E_neg[log(1 - h)], L_MIM = sum_k L_NCE^k; pool is the
    average over a 2 x 2 grid of equal cells (docs/method.md 'The MIM term')."""
    g = torch.Generator().manual_seed(4)
    syn_labels = torch.tensor([0, 0, 1, 1, 2])
    real_labels = torch.tensor([0, 0, 0, 1, 2, 2, 2])  # unbalanced: r = 24 / 11, not C - 1
    block_shapes = [(4, 6, 6), (3, 2, 2)]
    syn_maps = [torch.randn(len(syn_labels), *s, generator=g) for s in block_shapes]
    real_maps = [torch.randn(len(real_labels), *s, generator=g) for s in block_shapes]
    tau = 0.3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        term = MIMTerm([c * 4 for c, _, _ in block_shapes], head_dim=5, tau=tau)
    total, _ = term([pool_to_grid(m, 2) for m in syn_maps],
                    [pool_to_grid(m, 2) for m in real_maps], syn_labels, real_labels)

    def pooled(maps):  # N x C x H x W -> N x (C * 2 * 2), each cell the mean of its H/2 x W/2
        n, c, h, w = maps.shape
        return maps.numpy().reshape(n, c, 2, h // 2, 2, w // 2).mean(axis=(3, 5)).reshape(n, -1)

    def embedded(head, maps):
        z = pooled(maps) @ head.weight.detach().numpy().T + head.bias.detach().numpy()
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    positive = syn_labels.numpy()[:, None] == real_labels.numpy()[None, :]
    r = (~positive).sum() / positive.sum()

    def nce(z_syn, z_real):
        score = z_syn @ z_real.T / tau
        h = np.exp(score) / (np.exp(score) + r)
        return -np.log(h[positive]).mean() - r * np.log(1 - h[~positive]).mean()

    expected = sum(nce(embedded(hs, s), embedded(hr, x)) for hs, hr, s, x in zip(
        term.syn_heads, term.real_heads, syn_maps, real_maps, strict=True))
    # Pairs.of builds the means' weights (1 / #pairs) with .float(): float32 even in a float64
    # run, a relative error below 1e-7, so this one oracle is held to 1e-6.
    assert total.item() == pytest.approx(float(expected), rel=1e-6)
