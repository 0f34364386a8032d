"""No hidden waits for the device: per distillation step of every base and per evaluation
network, the operations that would make the host wait for a GPU (`mim4dd.syncs`), counted on
the CPU as they are dispatched. The logged loss's one read-back (`Distiller._read_back`, a
`tolist`) is the step's sync by design and is not an op the counter sees on the CPU."""

import shutil

import pytest
import torch
from conftest import tiny_config

from mim4dd.distill import Distiller
from mim4dd.experiment import evaluator_for
from mim4dd.experts import train_experts
from mim4dd.syncs import SyncCounter

EXPERTS = {"num_experts": 2, "expert_train_epochs": 2, "max_start_epoch": 1, "expert_epochs": 1,
           "syn_steps": 2, "lr_img": 100.0, "lr_lr": 1e-5}


@pytest.fixture(scope="module")
def expert_dir(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts")
    train_experts(tiny_config(base="mtt", expert_dir=str(folder), **EXPERTS), data=digits)
    return folder


def test_the_counter_sees_read_backs_and_data_dependent_shapes_only():
    x = torch.arange(6.0)
    with SyncCounter() as syncs:
        (x * 2 + 1).sum()  # queued work: no wait
        x[x > 2]  # a boolean mask: its size depends on the data
        torch.nonzero(x)
        float(x.max())  # a read-back
    assert dict(syncs.by_op) == {"index": 1, "nonzero": 1, "_local_scalar_dense": 1}
    assert syncs.total == 3 and not syncs.transfers


@pytest.mark.parametrize("lam", [0, 0.8])
@pytest.mark.parametrize("base", ["dm", "dc", "cafe", "mtt"])
def test_a_step_of_every_base_waits_for_nothing_but_its_logged_values(
        digits, expert_dir, base, lam):
    """MTT reads its learned step size back once more, for the guard that stops a diverging
    run before its images are corrupted (and logs that value rather than reading it again)."""
    extra = {"expert_dir": str(expert_dir), **EXPERTS} if base == "mtt" else {}
    distiller = Distiller(tiny_config(base=base, lam=lam, iterations=3, **extra), digits)
    distiller.step()  # the first step builds what later steps reuse
    with SyncCounter() as syncs:
        metrics = distiller.step()
    assert dict(syncs.by_op) == ({"_local_scalar_dense": 1} if base == "mtt" else {})
    assert ("syn_lr" in metrics) == (base == "mtt")


def test_an_mtt_step_reads_no_file(digits, expert_dir, tmp_path):
    """Expert trajectories are memory-mapped once per process: with every file gone, steps go
    on from the mappings, to the same images as with the files in place."""
    copy = shutil.copytree(expert_dir, tmp_path / "experts")
    config = tiny_config(base="mtt", lam=0.8, iterations=4, expert_dir=str(copy), **EXPERTS)
    distiller = Distiller(config, digits)
    for expert in range(config.num_experts):  # map every expert a step may draw
        distiller.objective.buffer.rows(expert, [0])
    shutil.rmtree(copy)
    gone = distiller.run()
    kept = Distiller(config.model_copy(update={"expert_dir": str(expert_dir)}), digits).run()
    assert torch.equal(gone.images, kept.images)


@pytest.mark.parametrize("parallel", [False, True])
def test_an_evaluation_network_trains_and_tests_without_waiting(digits, parallel):
    images, labels = digits.sample_per_class(5, torch.Generator().manual_seed(0))
    evaluator = evaluator_for(tiny_config(eval={"epochs": 2, "num_nets": 2, "batch_size": 10}),
                              digits)
    with SyncCounter() as syncs:
        evaluator.evaluate(images, labels, parallel=parallel)
    # The accuracies' one read-back per network group is a tolist, as the loss's.
    assert not syncs.by_op
