import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from mim4dd.config import Config, ModelConfig
from mim4dd.distill import Distiller
from mim4dd.evaluate import NetResult, network_metrics, network_seed
from mim4dd.experiment import (
    evaluate_random_baseline,
    evaluator_for,
    finished_in,
    random_real_subset,
    run_experiment,
)
from mim4dd.metrics import (
    TEST_ACC_MEAN,
    TEST_ACC_STD,
    VAL_ACC_MEAN,
    arch_metric,
    metric_architecture,
    net_metric,
)
from mim4dd.zoo import ARCHITECTURES, check_fits


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


def _fits(arch: str, size: int) -> bool:
    try:
        check_fits(arch, 1, size, ModelConfig(width=8))
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("arch", [name for name in ARCHITECTURES if not name.endswith("_bn")])
def test_every_pool_architecture_trains_the_same_stacked_under_vmap_as_alone(digits, arch):
    """The vmap path (the default on CUDA) of each architecture vmap can take, forced on CPU:
    networks trained together end where each one trained alone ends. In float64: in float32
    vmap's batched kernels sum in another order, and a few steps of SGD with momentum grow
    that rounding (measured 1e-3 on resnet18 after six steps; 1e-12 in float64)."""
    size = next(s for s in (12, 16, 28) if _fits(arch, s))  # the smallest it takes: fast
    images, labels = _set(digits, ipc=1)
    images = F.interpolate(images, size=size, mode="bilinear")
    data = dataclasses.replace(digits, info=dataclasses.replace(digits.info, image_size=size))
    config = tiny_config(eval={"epochs": 1, "num_nets": 2, "batch_size": 5, "models": [arch]})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        evaluator = evaluator_for(config, data)
        together = evaluator._train(arch, evaluator.seeds, images.double(), labels, lr=0.1)
        # The second network: it is where a stacking mistake would show (two momentum steps).
        alone = evaluator._train(arch, evaluator.seeds[1:], images.double(), labels, lr=0.1)
        for name, param in alone.net.named_parameters():
            torch.testing.assert_close(together.stacked[name][1], param, rtol=1e-9, atol=1e-10)
    finally:
        torch.set_default_dtype(previous)


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


# --- the evaluation pool: several architectures, batch norm, resuming --------------------

def test_the_default_evaluation_keeps_its_metric_names_and_json(digits):
    images, labels = _set(digits, ipc=1)
    result = evaluator_for(tiny_config(eval={"epochs": 1, "num_nets": 2}), digits).evaluate(
        images, labels)
    assert not result.per_architecture
    assert set(result.metrics()) == {net_metric(s, i) for s in ("test", "val") for i in (0, 1)} | {
        TEST_ACC_MEAN, TEST_ACC_STD, VAL_ACC_MEAN}
    assert list(result.to_dict()) == ["test_accuracies", "val_accuracies", "lr", "mean", "std",
                                      "val_mean"]


def test_two_architectures_give_per_architecture_results(digits):
    images, labels = _set(digits, ipc=2)
    config = tiny_config(eval={"epochs": 2, "num_nets": 2, "models": ["convnet", "mlp"]})
    result = evaluator_for(config, digits).evaluate(images, labels)
    assert result.per_architecture and list(result.by_architecture) == ["convnet", "mlp"]
    convnet, mlp = result.by_architecture.values()
    assert convnet is result and len(mlp.test_accuracies) == 2
    # The ConvNet is the same one a plain ConvNet evaluation trains.
    alone = evaluator_for(tiny_config(eval={"epochs": 2, "num_nets": 2}), digits)
    assert alone.evaluate(images, labels).test_accuracies == convnet.test_accuracies

    metrics = result.metrics()
    assert metrics[TEST_ACC_MEAN] == pytest.approx(100 * convnet.mean)  # the headline
    for arch, part in result.by_architecture.items():
        assert metrics[arch_metric(arch, TEST_ACC_MEAN)] == pytest.approx(100 * part.mean)
        assert metrics[arch_metric(arch, net_metric("test", 1))] == pytest.approx(
            100 * part.test_accuracies[1])
    assert metric_architecture(arch_metric("mlp", TEST_ACC_STD)) == ("mlp", TEST_ACC_STD)
    assert metric_architecture(TEST_ACC_STD) == (None, TEST_ACC_STD)
    saved = result.to_dict()
    assert saved["test_accuracies"] == convnet.test_accuracies
    assert saved["architectures"]["mlp"]["test_accuracies"] == mlp.test_accuracies
    assert "mlp" in str(result) and "convnet" in str(result)


def test_batch_norm_networks_test_in_eval_mode_with_running_statistics(digits):
    images, labels = _set(digits, ipc=3)  # 30 images, batches of 16: 2 steps an epoch
    config = tiny_config(model={"width": 8, "norm": "batch"},
                         eval={"epochs": 2, "num_nets": 2, "batch_size": 16})
    evaluator = evaluator_for(config, digits)
    ensemble = evaluator._train("convnet", [0], images, labels, 0.01)
    norms = [m for m in ensemble.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 4 for m in norms)
    stats = [m.running_mean.clone() for m in norms]
    accuracy = evaluator._accuracy(ensemble, "test")
    # What the reference does: eval mode, the running statistics, which testing leaves alone.
    assert not ensemble.net.training
    with torch.no_grad():
        predicted = ensemble.net(digits.test.images).argmax(-1)
    assert accuracy == [(predicted == digits.test.labels).sum().item() / len(digits.test)]
    assert all(torch.equal(m.running_mean, s) for m, s in zip(norms, stats, strict=True))
    # Networks with running statistics never train stacked under vmap: the same numbers.
    together = evaluator.evaluate(images, labels, parallel=True)
    assert together.test_accuracies == evaluator.evaluate(images, labels).test_accuracies


def test_a_resumed_evaluation_equals_an_uninterrupted_one(digits):
    images, labels = _set(digits, ipc=2)
    config = tiny_config(eval={"epochs": 2, "num_nets": 2, "models": ["mlp", "convnet"]})
    whole = evaluator_for(config, digits).evaluate(images, labels)

    class Stop(Exception):
        pass

    saved = []  # what a checkpoint holds: JSON, one entry per finished network

    def save_then_stop(net: NetResult):
        saved.append(json.dumps(dataclasses.asdict(net)))
        if len(saved) == 3:
            raise Stop

    with pytest.raises(Stop):
        evaluator_for(config, digits).evaluate(images, labels, on_network=save_then_stop)
    done = [NetResult(**json.loads(text)) for text in saved]
    trained = []
    resumed = evaluator_for(config, digits).evaluate(images, labels, done=done,
                                                     on_network=trained.append)
    assert [(n.architecture, n.index) for n in trained] == [("convnet", 1)]  # only the rest
    assert resumed.to_dict() == whole.to_dict() and resumed.metrics() == whole.metrics()

    stranger = dataclasses.replace(done[0], seed=99)
    with pytest.raises(ValueError, match="not one of this evaluation's"):
        evaluator_for(config, digits).evaluate(images, labels, done=[stranger])


@pytest.mark.parametrize("models", [["convnet"], ["mlp", "convnet"]])
def test_each_network_logs_the_names_the_whole_evaluation_gives_it(digits, models):
    images, labels = _set(digits, ipc=1)
    config = tiny_config(eval={"epochs": 1, "num_nets": 2, "models": models})
    networks = []
    whole = evaluator_for(config, digits).evaluate(images, labels, on_network=networks.append)
    logged = {}
    for net in networks:
        logged |= network_metrics(net, models)
    # Every per-network number, named and valued as the whole evaluation names it; only the
    # summaries (means, stds) are left for the end.
    assert logged == {k: v for k, v in whole.metrics().items() if "_net" in k}
    assert len(logged) == 2 * 2 * len(models) + (2 * 2 if len(models) > 1 else 0)


def test_the_final_state_is_checkpointed_before_evaluating(digits, tmp_path):
    from mim4dd.experiment import ExperimentCallback

    class Listener(ExperimentCallback):
        def __init__(self):
            self.events = []

        def on_checkpoint(self, iteration, state):
            self.events.append(("checkpoint", iteration))
            self.state = state

        def on_evaluation_start(self, config):
            self.events.append(("evaluate", None))

        def on_network(self, network):
            self.events.append(("network", network.index))

    config = tiny_config(iterations=3, eval={"epochs": 1, "num_nets": 2})
    first = Listener()
    whole = run_experiment(config, digits, callback=first, checkpoint_every=2)
    assert first.events == [("checkpoint", 2), ("checkpoint", 3), ("evaluate", None),
                            ("network", 0), ("network", 1)]
    # Resumed from that state with network 0 done: no distillation, the state once more (a
    # caller saves it with the networks), and only network 1 trains.
    again = Listener()
    done = [NetResult("convnet", 0, network_seed(config.eval, config.seed, 0),
                      whole.evaluation.test_accuracies[0],
                      whole.evaluation.val_accuracies[0])]
    resumed = run_experiment(config, digits, callback=again, checkpoint_every=2,
                             state=first.state, evaluated=done)
    assert again.events == [("checkpoint", 3), ("evaluate", None), ("network", 1)]
    assert resumed.evaluation.to_dict() == whole.evaluation.to_dict()
    # A last iteration that is a checkpoint iteration is saved once.
    once = Listener()
    run_experiment(tiny_config(iterations=2, eval={"epochs": 1, "num_nets": 1}), digits,
                   callback=once, checkpoint_every=2)
    assert once.events == [("checkpoint", 2), ("evaluate", None), ("network", 0)]


def test_each_run_seed_trains_networks_of_its_own_initialisation(digits):
    """By default network i's seed comes from (run seed, i): the spread over run seeds then
    includes initialisation. `net_seeds: shared` gives every run eval.seed + i."""
    def seeds(seed, **eval_settings):
        config = tiny_config(seed=seed, eval={"num_nets": 3, "seed": 5, **eval_settings})
        return evaluator_for(config, digits).seeds

    assert seeds(0) == seeds(0) and len(set(seeds(0))) == 3
    assert not set(seeds(0)) & set(seeds(1))
    assert seeds(0, net_seeds="shared") == seeds(1, net_seeds="shared") == [5, 6, 7]
    # The seeds reach the networks: run seeds 0 and 1 train from different weights.
    first, second = (evaluator_for(tiny_config(seed=s), digits) for s in (0, 1))
    weights = [next(e._network("convnet", e.seeds[0]).parameters()) for e in (first, second)]
    assert not torch.equal(*weights)


def test_a_config_saved_before_net_seeds_existed_reads_as_shared():
    saved = tiny_config().model_dump(mode="json")
    del saved["eval"]["net_seeds"]
    assert Config.from_saved(saved).eval.net_seeds == "shared"
    assert Config.model_validate(saved).eval.net_seeds == "per_run"  # a new config's default
    assert Config.from_saved(tiny_config().model_dump(mode="json")) == tiny_config()


def test_random_real_baseline_is_the_distillation_start(digits):
    config = tiny_config(ipc=2, eval={"epochs": 1, "num_nets": 1})
    images, labels = random_real_subset(config, digits)
    assert torch.equal(images, Distiller(config, digits).images.detach())
    assert torch.equal(labels, torch.arange(10).repeat_interleave(2))
    other, _ = random_real_subset(config, digits, seed=1)
    assert not torch.equal(other, images)
    baseline = evaluate_random_baseline(config, digits)
    direct = evaluator_for(config, digits).evaluate(images, labels)
    assert baseline.to_dict() == direct.to_dict() and baseline.lr == config.eval.lr


def test_a_pool_network_that_cannot_take_the_images_fails_before_distilling(digits):
    config = tiny_config(eval={"models": ["convnet", "vgg11"]})
    with pytest.raises(ValueError, match="vgg11: cannot take 1x8x8 images"):
        run_experiment(config, digits)


def test_results_from_before_eval_models_still_count_as_finished(tmp_path):
    config = tiny_config()
    old = config.model_dump(mode="json")
    del old["eval"]["models"]
    (tmp_path / "results.json").write_text(json.dumps({"config": old}))
    assert finished_in(tmp_path, config)
    assert not finished_in(tmp_path, tiny_config(eval={"models": ["mlp"]}))
