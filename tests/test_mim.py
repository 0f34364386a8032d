"""The MIM4DD term: the NCE critic, the heads, and lambda = 0 being exactly the base method."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    first_batch_loss_and_base,
    mim_share_of_first_step,
    run_interrupted,
    tiny_config,
)

from mim4dd.distill import HEADS_STREAM, Distiller, step_seed
from mim4dd.objectives import MIMTerm, nce_loss

LABELS_SYN = torch.arange(4).repeat_interleave(2)  # 4 classes x 2 synthetic
LABELS_REAL = torch.arange(4).repeat_interleave(5)  # 4 classes x 5 real


def _random_unit(n, d=16, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_nce_matches_a_hand_computation():
    z_syn, z_real = _random_unit(8, seed=1), _random_unit(20, seed=2)
    tau, r = 0.1, 15 / 5  # each synthetic image: 5 positives, 15 negatives
    s = z_syn @ z_real.T / tau
    h = torch.exp(s) / (torch.exp(s) + r)
    positive = LABELS_SYN[:, None] == LABELS_REAL[None, :]
    expected = -torch.log(h[positive]).mean() - r * torch.log(1 - h[~positive]).mean()
    got = nce_loss(z_syn, z_real, LABELS_SYN, LABELS_REAL, tau)
    assert torch.allclose(got, expected, rtol=1e-5)


def test_nce_falls_when_same_class_embeddings_align():
    prototypes = torch.eye(4, 16)  # one direction per class, orthogonal to the others
    noise = 0.05 * torch.randn(20, 16, generator=torch.Generator().manual_seed(4))
    aligned_real = F.normalize(prototypes[LABELS_REAL] + noise, dim=1)
    aligned_syn = F.normalize(prototypes[LABELS_SYN] + noise[:8], dim=1)
    aligned = nce_loss(aligned_syn, aligned_real, LABELS_SYN, LABELS_REAL, 0.1)
    scattered = nce_loss(_random_unit(8, seed=5), _random_unit(20, seed=6), LABELS_SYN, LABELS_REAL, 0.1)
    assert aligned < 0.5 * scattered


def test_nce_gradient_pulls_positives_and_pushes_negatives():
    z_syn = _random_unit(8, seed=7).requires_grad_(True)
    z_real = _random_unit(20, seed=8)
    positive = LABELS_SYN[:, None] == LABELS_REAL[None, :]
    before = (z_syn @ z_real.T).detach()
    nce_loss(F.normalize(z_syn, dim=1), z_real, LABELS_SYN, LABELS_REAL, 0.1).backward()
    with torch.no_grad():
        after = F.normalize(z_syn - 0.05 * z_syn.grad, dim=1) @ z_real.T
    assert (after - before)[positive].mean() > 0
    assert (after - before)[~positive].mean() < 0


def test_nce_is_finite_for_extreme_scores_and_zero_without_negatives():
    z = _random_unit(8, seed=9)
    loss = nce_loss(z, z.clone(), LABELS_SYN, LABELS_SYN, tau=1e-4)
    assert math.isfinite(float(loss))
    single_class = torch.zeros(8, dtype=torch.long)
    assert float(nce_loss(z, z, single_class, single_class, 0.1)) == 0.0


def test_mim_term_sums_blocks():
    term = MIMTerm([12, 6], head_dim=4, tau=0.5)
    syn = [torch.randn(8, 12), torch.randn(8, 6)]
    real = [torch.randn(20, 12), torch.randn(20, 6)]
    total, per_block = term(syn, real, LABELS_SYN, LABELS_REAL)
    assert len(per_block) == 2 and torch.allclose(total, per_block[0] + per_block[1])


def test_gradient_reaches_images_and_heads(digits):
    distiller = Distiller(tiny_config(lam=0.8), digits)
    loss, metrics = distiller.loss(distiller.batch(0))
    loss.backward()
    assert distiller.images.grad.abs().sum() > 0
    for head in [*distiller.mim.syn_heads, *distiller.mim.real_heads]:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert set(metrics) >= {"loss", "loss_base", "loss_mim", "loss_mim_block1", "loss_mim_block3"}


def test_lambda_zero_is_exactly_the_base_method(digits):
    distiller = Distiller(tiny_config(lam=0.0), digits)
    loss, base, grad, base_grad, metrics = first_batch_loss_and_base(distiller)
    assert torch.equal(loss, base) and torch.equal(grad, base_grad)
    assert "loss_mim" not in metrics
    heads = [p.clone() for p in distiller.mim.parameters()]
    distiller.step()
    assert all(torch.equal(a, b) for a, b in zip(heads, distiller.mim.parameters()))
    # ...while any positive lambda does change the gradient (so the check above can fail).
    with_mim = Distiller(tiny_config(lam=0.8), digits)
    loss, _ = with_mim.loss(with_mim.batch(0))
    (mim_grad,) = torch.autograd.grad(loss, with_mim.images)
    assert not torch.allclose(mim_grad, base_grad)


def test_only_selected_blocks_get_heads(digits):
    distiller = Distiller(tiny_config(mim_blocks=[3], mim_grid=1), digits)
    assert len(distiller.mim.syn_heads) == 1
    assert distiller.mim.syn_heads[0].in_features == 8  # width 8 x 1 x 1
    _, metrics = distiller.loss(distiller.batch(0))
    assert "loss_mim_block3" in metrics and "loss_mim_block1" not in metrics


@pytest.mark.parametrize("base", ["dm", "dc"])
def test_the_step_applies_lambda_times_the_mim_gradient_and_logs_its_share(digits, base):
    share, logged, mim_over_base = mim_share_of_first_step(
        lambda: Distiller(tiny_config(base=base, lam=0.8), digits))
    assert share == pytest.approx(0.8 * mim_over_base, rel=1e-3)
    assert logged == pytest.approx(share, rel=1e-3)


@pytest.mark.parametrize("base", ["dm", "dc"])
@pytest.mark.parametrize("lam", [0.1, 2.0])
def test_relative_mode_gives_the_mim_term_lambda_times_the_base_gradient(digits, base, lam):
    share, logged, mim_over_base = mim_share_of_first_step(
        lambda: Distiller(tiny_config(base=base, lam=lam, lam_mode="relative"), digits))
    assert share == pytest.approx(lam, rel=1e-3) and logged == pytest.approx(lam, rel=1e-3)
    assert mim_over_base != pytest.approx(1.0, rel=0.05)  # the raw scales differ: it rescaled


def _heads(distiller):
    return [p.detach().clone() for p in distiller.mim.parameters()]


def test_fixed_heads_never_move_but_the_mim_term_still_moves_the_images(digits):
    distiller = Distiller(tiny_config(mim_heads="fixed"), digits)
    drawn = _heads(distiller)
    _, _, grad, base_grad, _ = first_batch_loss_and_base(distiller)
    assert not torch.allclose(grad, base_grad)  # the projection is fixed, not inert
    for _ in range(2):
        distiller.step()
    assert all(torch.equal(a, b) for a, b in zip(drawn, _heads(distiller)))
    learned = Distiller(tiny_config(), digits)
    learned.step()  # ...whereas learned heads do move (so the check above can fail)
    assert not all(torch.equal(a, b) for a, b in zip(drawn, _heads(learned)))


def test_per_step_heads_are_drawn_anew_and_fitted_to_each_steps_features(digits):
    distiller = Distiller(tiny_config(mim_heads="per_step"), digits)
    batch = distiller.batch(0)  # its generator is used up by one match: terms gets its own
    out = distiller.objective.match(batch, with_features=True)
    args = (out.syn_features, out.real_features, batch.syn_labels, batch.real_labels)
    _, _, parts = distiller.terms(distiller.batch(0))
    fitted = copy.deepcopy(distiller.mim)
    drawn = copy.deepcopy(distiller.mim)
    drawn.redraw(step_seed(0, 0, stream=HEADS_STREAM))  # the step's draw, before fitting
    with torch.no_grad():
        assert float(fitted(*args)[0]) < float(drawn(*args)[0])  # fitting lowered L_MIM
        assert float(parts["loss_mim"]) == pytest.approx(float(fitted(*args)[0]), rel=1e-5)
    distiller.terms(distiller.batch(1))
    assert not all(torch.equal(a, b) for a, b in zip(fitted.parameters(), _heads(distiller)))
    again = Distiller(tiny_config(mim_heads="per_step"), digits)
    again.terms(again.batch(0))  # a function of (seed, iteration): resumable
    assert all(torch.equal(a, b) for a, b in zip(fitted.parameters(), _heads(again)))


@pytest.mark.parametrize("heads", ["fixed", "per_step"])
def test_resume_is_exact_with_every_kind_of_heads(digits, tmp_path, heads):
    config = tiny_config(mim_heads=heads, iterations=4)
    uninterrupted = Distiller(config, digits).run()
    result = run_interrupted(config, digits, tmp_path / "state.pt", stop_at=2)
    assert torch.equal(result.images, uninterrupted.images)
