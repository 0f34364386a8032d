import pytest
import torch
from conftest import run_interrupted, tiny_config

from mim4dd.config import Config
from mim4dd.distill import DistillCallback, Distiller, NonFiniteLossError


def test_images_start_from_real_images_of_their_class(digits):
    distiller = Distiller(tiny_config(ipc=3), digits)
    assert torch.equal(distiller.syn_labels, torch.arange(10).repeat_interleave(3))
    train = {tuple(x.flatten().tolist()): int(y) for x, y in zip(digits.train.images, digits.train.labels)}
    for image, label in zip(distiller.images.detach(), distiller.syn_labels):
        assert train[tuple(image.flatten().tolist())] == int(label)


def test_noise_init_and_schedule(digits):
    distiller = Distiller(tiny_config(init="noise", lr_milestones=[2], iterations=3), digits)
    lrs = [distiller.step()["lr_img"] for _ in range(3)]
    assert lrs == [0.1, 0.1, 0.05]


def test_distillation_changes_images_and_reports_progress(digits):
    events = []

    class Recorder(DistillCallback):
        def on_iteration(self, iteration, metrics):
            events.append(("it", iteration, metrics["loss"]))

        def on_checkpoint(self, iteration, state):
            events.append(("ckpt", iteration, state["iteration"]))

    distiller = Distiller(tiny_config(iterations=4), digits)
    start = distiller.images.detach().clone()
    synset = distiller.run(Recorder(), checkpoint_every=2)
    assert [e[1] for e in events if e[0] == "it"] == [1, 2, 3, 4]
    assert [e[1:] for e in events if e[0] == "ckpt"] == [(2, 2), (4, 4)]
    assert not torch.equal(synset.images, start)
    assert synset.manifest["config"]["lam"] == 0.8 and synset.ipc == 2


@pytest.mark.parametrize("lam", [0.0, 0.8])
def test_resume_equals_uninterrupted(digits, tmp_path, lam):
    config = tiny_config(lam=lam, iterations=6, lr_milestones=[3])
    uninterrupted = Distiller(config, digits).run()
    result = run_interrupted(config, digits, tmp_path / "state.pt", stop_at=3)
    assert torch.equal(result.images, uninterrupted.images)


def test_state_from_another_config_is_refused(digits, tmp_path):
    distiller = Distiller(tiny_config(), digits)
    distiller.save_state(tmp_path / "state.pt")
    with pytest.raises(ValueError, match="different config"):
        Distiller(tiny_config(lam=0.4), digits).load_state(tmp_path / "state.pt")


def test_non_finite_loss_stops_with_the_iteration(digits):
    distiller = Distiller(tiny_config(lr_img=1e30, iterations=10), digits)
    with pytest.raises(NonFiniteLossError, match=r"at iteration \d+"):
        distiller.run()
    assert distiller.iteration < 10


def test_ipc_larger_than_the_smallest_class_is_a_clear_error(digits):
    with pytest.raises(ValueError, match="ipc=500 needs at least"):
        Distiller(Config(dataset="digits", ipc=500), digits)
