import pytest
import torch
from conftest import tiny_config

from mim4dd.experiment import evaluator_for


def _set(digits, ipc=5):
    return digits.sample_per_class(ipc, torch.Generator().manual_seed(0))


def test_evaluation_is_deterministic_under_a_seed(digits):
    images, labels = _set(digits)
    config = tiny_config(eval={"epochs": 5, "num_nets": 3, "seed": 0})
    first = evaluator_for(config, digits).evaluate(images, labels)
    second = evaluator_for(config, digits).evaluate(images, labels)
    assert first.test_accuracies == second.test_accuracies
    assert len(first.test_accuracies) == 3 and len(first.val_accuracies) == 3
    other = evaluator_for(tiny_config(eval={"epochs": 5, "num_nets": 3, "seed": 7}), digits)
    assert other.evaluate(images, labels).test_accuracies != first.test_accuracies


def test_networks_trained_together_equal_networks_trained_alone(digits):
    images, labels = _set(digits)
    evaluator = evaluator_for(tiny_config(eval={"epochs": 4, "num_nets": 3}), digits)
    together = evaluator.evaluate(images, labels, parallel=True)
    alone = evaluator.evaluate(images, labels, parallel=False)
    assert together.test_accuracies == alone.test_accuracies


def test_training_learns_and_statistics_are_consistent(digits):
    images, labels = _set(digits, ipc=10)
    config = tiny_config(model={"width": 16}, eval={"epochs": 100, "num_nets": 2, "lr": 0.05})
    result = evaluator_for(config, digits).evaluate(images, labels)
    assert result.mean > 0.3  # ten classes: chance is 0.1
    accs = torch.tensor(result.test_accuracies, dtype=torch.float64)
    assert abs(result.mean - float(accs.mean())) < 1e-9
    assert abs(result.std - float(accs.std(unbiased=False))) < 1e-6


def test_a_learned_lr_overrides_the_configured_one(digits):
    images, labels = _set(digits, ipc=1)
    evaluator = evaluator_for(tiny_config(eval={"epochs": 2, "num_nets": 1}), digits)
    assert evaluator.evaluate(images, labels, lr=torch.tensor(0.003)).lr == pytest.approx(0.003)
    assert evaluator.evaluate(images, labels).lr == 0.01


def test_batch_norm_networks_can_be_evaluated(digits):
    images, labels = _set(digits, ipc=2)
    config = tiny_config(model={"width": 8, "norm": "batch"}, eval={"epochs": 2, "num_nets": 2})
    result = evaluator_for(config, digits).evaluate(images, labels)
    assert len(result.test_accuracies) == 2
