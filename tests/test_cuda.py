"""The CUDA paths: run where a GPU is present, skipped elsewhere (CI has none)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from mim4dd.distill import Distiller
from mim4dd.experiment import evaluator_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("base", ["dm", "dc"])
def test_a_cuda_step_matches_the_cpu_step(digits, base):
    on_cpu = Distiller(tiny_config(base=base, device="cpu"), digits)
    on_gpu = Distiller(tiny_config(base=base, device="cuda"), digits)
    for _ in range(2):
        cpu_loss, gpu_loss = on_cpu.step()["loss"], on_gpu.step()["loss"]
        assert gpu_loss == pytest.approx(cpu_loss, rel=1e-3)
    torch.testing.assert_close(on_gpu.images.cpu(), on_cpu.images, rtol=1e-3, atol=1e-4)


def test_networks_train_together_on_cuda_by_default_and_match_one_by_one(digits):
    config = tiny_config(device="cuda", eval={"epochs": 3, "num_nets": 3, "batch_size": 64})
    evaluator = evaluator_for(config, digits)
    images, labels = digits.sample_per_class(2, torch.Generator().manual_seed(0))
    together = evaluator.evaluate(images, labels)  # parallel=None: vmap on CUDA
    alone = evaluator.evaluate(images, labels, parallel=False)
    assert together.test_accuracies == pytest.approx(alone.test_accuracies, abs=0.02)
