"""Trajectory matching (MTT): the unrolled student, the learned step size, resume, guards."""

import pytest
import torch
from conftest import (
    first_batch_loss_and_base, mim_share_of_first_step, run_interrupted, tiny_config,
)

from mim4dd.config import ModelConfig
from mim4dd.distill import Distiller
from mim4dd.experiment import evaluate_synset
from mim4dd.experts import train_experts
from mim4dd.flat import FlatParams
from mim4dd.models import build_model
from mim4dd.objectives import StepSizeError, unroll
from mim4dd.objectives.trajectory import normalised_distance
from mim4dd.synset import SyntheticSet

EXPERT_SETTINGS = dict(num_experts=2, expert_train_epochs=3, max_start_epoch=2, expert_epochs=1)


def mtt_config(expert_dir, **overrides):
    settings = dict(base="mtt", expert_dir=str(expert_dir), syn_steps=3, lr_img=100.0,
                    lr_lr=1e-5, **EXPERT_SETTINGS)
    settings.update(overrides)
    return tiny_config(**settings)


@pytest.fixture(scope="module")
def experts(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts")
    train_experts(mtt_config(folder), data=digits)
    return folder


def test_flat_parameters_call_the_same_network():
    net = build_model(1, 8, 10, ModelConfig(width=4), seed=0)
    flat = FlatParams(net)
    x = torch.randn(3, 1, 8, 8)
    vector = flat.flatten(net)
    assert vector.shape == (sum(p.numel() for p in net.parameters()),)
    assert torch.allclose(flat(vector, x), net(x))
    assert all(torch.allclose(a, b) for a, b in zip(flat.block_features(vector, x),
                                                    net.block_features(x)))


def test_unrolled_student_is_differentiable_in_images_and_step_size():
    # float64 gradcheck on a tiny one-block net: the double backward through every student
    # step must give the derivative finite differences see, for the pixels and the step size.
    net = build_model(1, 8, 2, ModelConfig(width=2, depth=1), seed=0).double()
    model = FlatParams(net)
    g = torch.Generator().manual_seed(0)
    start = model.flatten(net)
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    images = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    def matching_loss(images, lr):
        generator = torch.Generator().manual_seed(1)  # the same mini-batches on every call
        student = unroll(model, start, images, labels, lr, steps=3, batch_size=2,
                         generator=generator)
        return normalised_distance(student, start, target)

    assert torch.autograd.gradcheck(matching_loss, (images, lr), eps=1e-6, atol=1e-5)


def test_mtt_step_trains_images_and_step_size(digits, experts):
    distiller = Distiller(mtt_config(experts, lam=0.8), digits)
    start = distiller.images.detach().clone()
    metrics = distiller.step()
    assert {"loss_base", "loss_mim", "syn_lr"} <= set(metrics)
    assert metrics["syn_lr"] != 0.01 and not torch.equal(distiller.images, start)


def test_lambda_zero_is_exactly_trajectory_matching(digits, experts):
    distiller = Distiller(mtt_config(experts, lam=0.0), digits)
    loss, base, grad, base_grad, metrics = first_batch_loss_and_base(distiller)
    assert torch.equal(loss, base) and torch.equal(grad, base_grad) and "loss_mim" not in metrics


@pytest.mark.parametrize("lam", [0.0, 0.8])
def test_resume_equals_uninterrupted(digits, experts, tmp_path, lam):
    config = mtt_config(experts, lam=lam, iterations=4)
    uninterrupted = Distiller(config, digits).run()
    result = run_interrupted(config, digits, tmp_path / "state.pt", stop_at=2)
    assert torch.equal(result.images, uninterrupted.images)
    assert torch.equal(result.lr, uninterrupted.lr)


def test_learned_step_size_is_saved_and_used_by_evaluation(digits, experts, tmp_path):
    distiller = Distiller(mtt_config(experts, iterations=2), digits)
    synset = distiller.run()
    assert synset.lr is not None and torch.equal(synset.lr, distiller.objective.syn_lr.detach())
    loaded = SyntheticSet.load(synset.save(tmp_path / "set"))
    assert torch.equal(loaded.lr, synset.lr)
    first = evaluate_synset(synset, distiller.config, digits)
    again = evaluate_synset(loaded, distiller.config, digits)
    assert first.lr == float(synset.lr) and first.test_accuracies == again.test_accuracies


def test_step_size_guard_stops_the_run(digits, experts):
    # A huge lr for the step size throws it far out of (0, syn_lr_max] on the first update.
    distiller = Distiller(mtt_config(experts, lr_lr=1e4, iterations=3), digits)
    with pytest.raises(StepSizeError, match=r"step size became .* at iteration 0"):
        distiller.run()
    assert distiller.iteration == 0


@pytest.mark.parametrize("mode, lam", [("absolute", 0.8), ("relative", 0.5)])
def test_the_mim_share_of_the_image_gradient_is_logged_and_relative_mode_sets_it(
    digits, experts, mode, lam
):
    share, logged, mim_over_base = mim_share_of_first_step(
        lambda: Distiller(mtt_config(experts, lam=lam, lam_mode=mode), digits))
    assert logged == pytest.approx(share, rel=1e-3)
    assert share == pytest.approx(lam * mim_over_base if mode == "absolute" else lam, rel=1e-3)


def test_the_real_side_of_the_mim_term_reads_the_network_mim_real_net_names(digits, experts):
    features = {}
    for net in ("target", "start", "student"):
        distiller = Distiller(mtt_config(experts, mim_real_net=net), digits)
        out = distiller.objective.match(distiller.batch(0), with_features=True)
        features[net] = out.real_features[-1]
        assert not out.real_features[-1].requires_grad  # real features never carry gradient
    assert not torch.allclose(features["target"], features["start"])
    assert not torch.allclose(features["target"], features["student"])
    with pytest.raises(ValueError, match="mim_real_net 'start' is for base mtt only"):
        tiny_config(mim_real_net="start")
