"""Gradient matching (DC/DSA): the distance, the loops by IPC, the network schedule, resume."""

import pytest
import torch
from conftest import first_batch_loss_and_base, run_interrupted, tiny_config

from mim4dd.distill import Distiller
from mim4dd.models import build_model
from mim4dd.objectives import gradient_distance, loops_for_ipc
from mim4dd.objectives.gradient import REFERENCE_LOOPS


def _grads(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 2, 3, 3), (3,), (4, 5), (4,)]  # conv weight, bias, linear weight, bias
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def test_ours_distance_matches_a_hand_computation():
    syn, real = _grads(0), _grads(1)
    expected = 0.0
    for s, r in zip(syn, real):
        if s.dim() == 1:
            continue  # biases are not matched
        for i in range(s.shape[0]):  # one row per output unit
            a, b = s[i].flatten().tolist(), r[i].flatten().tolist()
            dot = sum(x * y for x, y in zip(a, b))
            norms = sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5
            expected += 1 - dot / (norms + 1e-6)
    assert gradient_distance(syn, real, "ours").item() == pytest.approx(expected, rel=1e-12)


def test_mse_and_cos_distances_match_a_hand_computation():
    syn, real = _grads(2), _grads(3)
    a = [x for g in syn for x in g.flatten().tolist()]
    b = [y for g in real for y in g.flatten().tolist()]
    mse = sum((x - y) ** 2 for x, y in zip(a, b))
    dot = sum(x * y for x, y in zip(a, b))
    cos = 1 - dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5 + 1e-6)
    assert gradient_distance(syn, real, "mse").item() == pytest.approx(mse, rel=1e-12)
    assert gradient_distance(syn, real, "cos").item() == pytest.approx(cos, rel=1e-12)
    assert gradient_distance(syn, syn, "ours").item() == pytest.approx(0, abs=1e-4)  # eps only


def test_loops_follow_the_reference_and_exist_for_any_ipc():
    for ipc, loops in REFERENCE_LOOPS.items():
        assert loops_for_ipc(ipc) == loops
    inners = [loops_for_ipc(ipc)[1] for ipc in range(10, 301)]
    assert all(inner >= 1 for inner in inners)
    assert inners == sorted(inners, reverse=True)  # more images per class, fewer epochs
    assert loops_for_ipc(7)[0] == 7 and loops_for_ipc(100) == (100, 5)


def test_network_is_fresh_every_outer_loop_and_trained_in_between(digits):
    distiller = Distiller(tiny_config(base="dc", outer_loop=3, inner_loop=2, lam=0), digits)
    objective = distiller.objective

    def weights():
        return [p.detach().clone() for p in objective.net.parameters()]

    def fresh(iteration):
        info = digits.info
        net = build_model(info.channels, info.image_size, info.num_classes,
                          distiller.config.model, seed=distiller.batch(iteration).seed)
        return [p.detach() for p in net.parameters()]

    distiller.step()  # iteration 0: a fresh network, then trained on the synthetic set
    after_first = weights()
    assert not all(torch.equal(a, b) for a, b in zip(after_first, fresh(0)))
    distiller.step()  # iteration 1: trained again
    after_second = weights()
    assert not all(torch.equal(a, b) for a, b in zip(after_second, after_first))
    distiller.step()  # iteration 2: last of the outer loop, so no training
    assert all(torch.equal(a, b) for a, b in zip(weights(), after_second))
    distiller.step()  # iteration 3: a new network, seeded by that step
    assert not all(torch.equal(a, b) for a, b in zip(weights(), after_second))


def test_lambda_zero_is_exactly_gradient_matching(digits):
    distiller = Distiller(tiny_config(base="dc", lam=0.0), digits)
    loss, base, grad, base_grad, _ = first_batch_loss_and_base(distiller)
    assert torch.equal(loss, base) and torch.equal(grad, base_grad)
    assert base_grad.abs().sum() > 0


def test_mim_features_come_from_the_trained_network(digits):
    distiller = Distiller(tiny_config(base="dc", lam=0.8), digits)
    batch = distiller.batch(0)
    out = distiller.objective.match(batch, with_features=True)
    assert [f.shape[0] for f in out.real_features] == [len(batch.real_labels)] * 3
    assert [f.shape[0] for f in out.syn_features] == [len(batch.syn_labels)] * 3
    loss, metrics = distiller.loss(batch)
    loss.backward()
    assert distiller.images.grad.abs().sum() > 0 and "loss_mim" in metrics


@pytest.mark.parametrize("lam", [0.0, 0.8])
def test_resume_equals_uninterrupted(digits, tmp_path, lam):
    # Interrupted in the middle of an outer loop: the trained network must come back exactly.
    config = tiny_config(base="dc", lam=lam, iterations=5, outer_loop=3, inner_loop=2,
                         dis_metric="ours")
    uninterrupted = Distiller(config, digits).run()
    result = run_interrupted(config, digits, tmp_path / "state.pt", stop_at=2)
    assert torch.equal(result.images, uninterrupted.images)
