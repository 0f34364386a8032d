"""CAFE: the loss against a hand computation, lambda = 0 is CAFE alone, the MIM share, the
network trained alongside, resume, presets and one run end to end."""

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    first_batch_loss_and_base, mim_share_of_first_step, run_interrupted, tiny_config,
)

from mim4dd.config import Config
from mim4dd.distill import Distiller
from mim4dd.experiment import run_experiment
from mim4dd.objectives import cafe
from mim4dd.presets import preset_names


def _layers_by_hand(net, x):
    """Each block's map before its 2x2 average pooling, then the flattened embedding, with the
    block's layers written out (conv 3x3 -> instance norm -> ReLU -> pool)."""
    layers = []
    for conv, norm, _relu, _pool in net.blocks:
        x = F.conv2d(x, conv.weight, conv.bias, padding=conv.padding)
        x = F.relu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps))
        layers.append(x.flatten(1))
        x = F.avg_pool2d(x, 2)
    return [*layers, x.flatten(1)]


def test_loss_matches_a_hand_computation(digits, monkeypatch):
    # Real images in chunks of 7 (not a divisor of a class's 16): the chunked sums must add up.
    monkeypatch.setattr(cafe, "REAL_CHUNK", 7)
    distiller = Distiller(tiny_config(base="cafe", lam=0.0), digits)
    loss = distiller.objective.match(distiller.batch(0), with_features=False).base_loss

    batch = distiller.batch(0)  # the same step again: same real images, same DSA draw
    net, dsa, classes = distiller.objective.net, distiller.objective.dsa, 10
    params = dsa.sample(classes, batch.generator, distiller.device)
    with torch.no_grad():
        real = _layers_by_hand(net, dsa.apply(batch.real, params, batch.real_labels))
        syn = _layers_by_hand(net, dsa.apply(batch.syn, params, batch.syn_labels))
    weights = [0.1, 0.1, 1.0, 2.0]  # blocks 1, 2, 3 before pooling; the embedding
    align = 0.0
    for w, f_real, f_syn in zip(weights, real, syn, strict=True):
        for c in range(classes):
            gap = f_real[batch.real_labels == c].mean(0) - f_syn[batch.syn_labels == c].mean(0)
            align += w * (gap**2).sum()
    centres = torch.stack([syn[-1][batch.syn_labels == c].mean(0) for c in range(classes)])
    disc = 0.0
    for embedding, label in zip(real[-1], batch.real_labels, strict=True):
        logits = embedding @ centres.T
        disc += torch.logsumexp(logits, 0) - logits[label]  # cross-entropy of one real image
    assert align > 0 and disc > 0
    assert loss.item() == pytest.approx((align + 0.01 * disc).item(), rel=1e-5)


def test_lambda_zero_is_exactly_cafe(digits):
    distiller = Distiller(tiny_config(base="cafe", lam=0.0), digits)
    loss, base, grad, base_grad, metrics = first_batch_loss_and_base(distiller)
    assert torch.equal(loss, base) and torch.equal(grad, base_grad)
    assert base_grad.abs().sum() > 0 and "loss_mim" not in metrics
    heads = [p.clone() for p in distiller.mim.parameters()]
    distiller.step()
    assert all(torch.equal(a, b) for a, b in zip(heads, distiller.mim.parameters(), strict=True))
    with_mim = Distiller(tiny_config(base="cafe", lam=0.8), digits)
    loss, _ = with_mim.loss(with_mim.batch(0))
    (mim_grad,) = torch.autograd.grad(loss, with_mim.images)
    assert not torch.allclose(mim_grad, base_grad)  # so the check above can fail


def test_mim_features_are_the_trained_networks_block_maps(digits):
    distiller = Distiller(tiny_config(base="cafe"), digits)
    batch = distiller.batch(0)
    out = distiller.objective.match(batch, with_features=True)
    # One row per image in label order; per block: width 8 x 2 x 2 grid (the 1x1 last map
    # is upsampled by the adaptive pool).
    assert [tuple(f.shape) for f in out.real_features] == [(len(batch.real_labels), 32)] * 3
    assert [tuple(f.shape) for f in out.syn_features] == [(len(batch.syn_labels), 32)] * 3
    assert not any(f.requires_grad for f in out.real_features)
    assert all(f.requires_grad for f in out.syn_features)


def test_the_step_applies_lambda_times_the_mim_gradient(digits):
    share, logged, mim_over_base = mim_share_of_first_step(
        lambda: Distiller(tiny_config(base="cafe", lam=0.8), digits))
    assert share == pytest.approx(0.8 * mim_over_base, rel=1e-3)
    assert logged == pytest.approx(share, rel=1e-3)


def test_relative_mode_gives_the_mim_term_lambda_times_the_base_gradient(digits):
    share, logged, mim_over_base = mim_share_of_first_step(
        lambda: Distiller(tiny_config(base="cafe", lam=0.5, lam_mode="relative"), digits))
    assert share == pytest.approx(0.5, rel=1e-3) and logged == pytest.approx(0.5, rel=1e-3)
    assert mim_over_base != pytest.approx(0.5, rel=0.05)  # the raw scales differ: it rescaled


def test_network_is_trained_between_updates_and_fresh_every_outer_loop(digits):
    default = Distiller(tiny_config(base="cafe"), digits).objective
    assert (default.outer_loop, default.inner_loop) == (cafe.OUTER_LOOP, cafe.INNER_LOOP)
    distiller = Distiller(tiny_config(base="cafe", outer_loop=2, inner_loop=1, lam=0), digits)
    objective = distiller.objective

    def weights():
        return [p.detach().clone() for p in objective.net.parameters()]

    distiller.step()  # a fresh network, then trained on the updated set
    fresh = [p.detach() for p in Distiller(tiny_config(base="cafe", lam=0), digits)
             .objective.network(distiller.batch(0)).parameters()]
    trained = weights()
    assert not all(torch.equal(a, b) for a, b in zip(trained, fresh, strict=True))
    distiller.step()  # last update of this network's turn: not trained
    assert all(torch.equal(a, b) for a, b in zip(weights(), trained, strict=True))
    distiller.step()  # a new network
    assert not all(torch.equal(a, b) for a, b in zip(weights(), trained, strict=True))


@pytest.mark.parametrize("lam", [0.0, 0.8])
def test_resume_equals_uninterrupted(digits, tmp_path, lam):
    # Stopped in the middle of a network's turn: its weights and optimiser must come back.
    config = tiny_config(base="cafe", lam=lam, iterations=5, outer_loop=3, inner_loop=2)
    uninterrupted = Distiller(config, digits).run()
    result = run_interrupted(config, digits, tmp_path / "state.pt", stop_at=2)
    assert torch.equal(result.images, uninterrupted.images)


def test_presets_are_valid_configs():
    assert preset_names("cafe") == [f"{d}-ipc{k}" for d in ("cifar10", "fashionmnist")
                                    for k in (1, 10, 50)]
    for name in preset_names("cafe"):
        config = Config(base="cafe", preset=name)
        assert (config.lr_img, config.momentum_img, config.lr_gamma) == (0.1, 0.5, 0.5)
        assert config.ipc == int(name.split("-ipc")[1])


def test_distills_and_evaluates_end_to_end(digits):
    config = tiny_config(base="cafe", iterations=3)
    seen = []

    class Listener:
        def on_start(self, distiller):
            assert type(distiller.objective) is cafe.CAFE

        def on_iteration(self, iteration, metrics):
            seen.append(metrics)

        def on_checkpoint(self, iteration, state):
            pass

    result = run_experiment(config, digits, callback=Listener())
    assert len(seen) == 3 and all("loss_mim" in m for m in seen)
    assert result.synset.images.shape[0] == 10 * config.ipc
    assert len(result.evaluation.test_accuracies) == config.eval.num_nets
    assert all(0 <= acc <= 1 for acc in result.evaluation.test_accuracies)
