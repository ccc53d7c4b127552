"""firm.training: the batch plan (which image and which variant fills each slot of a batch), the
Trainer's input checks, a NaN loss, checkpoints of another model, the time of a resumed run, and
the learning-rate schedule of the paper preset, and that a learning curve never changes training."""
import dataclasses
import math
import time
import warnings

import pytest
import torch

from firm.config import ModelConfig, TrainConfig, preset
from firm.models import Encoder
from firm.rundir import CHECKPOINT, train_files
from firm.serialization import ModelFileError, load_tensors
from firm.training import BatchPlan, Trainer, TrainingError

TINY = ModelConfig(width=4, head_hidden=16, head_layers=1)


def test_pool_plan_is_the_authors_composition():
    plan = BatchPlan(num_images=100, batch_size=20, num_variants=3, seed=0)
    index, variant = plan.epoch(0)
    assert index.shape == (20, 20)
    # every (image, variant) pair of the 4x pool appears exactly once per epoch
    pairs = set(zip(index.flatten().tolist(), variant.flatten().tolist()))
    assert len(pairs) == 400
    assert abs((variant == 0).float().mean().item() - 0.25) < 1e-9


def test_pool_smaller_than_one_batch_fills_the_batch_with_every_pair():
    plan = BatchPlan(num_images=5, batch_size=32, num_variants=3, seed=0)  # pool of 20 < batch of 32
    index, variant = plan.epoch(0)
    assert index.shape == variant.shape == (1, 32)
    assert len(set(zip(index.flatten().tolist(), variant.flatten().tolist()))) == 20


def test_id_share_plan_and_determinism():
    plan = BatchPlan(num_images=50, batch_size=16, num_variants=3, id_share=0.5, seed=3)
    index, variant = plan.epoch(2)
    assert ((variant == 0).sum(1) == 8).all()
    assert set(index[variant == 0].tolist()) == set(range(50))  # every inlier seen once per epoch
    assert variant[variant > 0].min() >= 1 and variant.max() <= 3
    again = plan.epoch(2)
    assert torch.equal(again[0], index) and torch.equal(again[1], variant)
    assert not torch.equal(plan.epoch(3)[0], index)


def test_plan_with_auxiliary_outliers_draws_their_indices():
    plan = BatchPlan(num_images=10, batch_size=8, num_variants=3, outlier_sources=1000, seed=0)
    index, variant = plan.epoch(0)
    assert index[variant == 0].max() < 10
    assert index[variant > 0].max() >= 10  # outlier slots index the auxiliary set


def test_plan_rejects_bad_settings():
    with pytest.raises(ValueError, match="empty"):
        BatchPlan(0, 8, 3)
    with pytest.raises(ValueError, match="id_share"):
        BatchPlan(10, 8, 3, id_share=1.5)


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    images = torch.randint(0, 255, (40, 3, 32, 32), dtype=torch.uint8)
    cfg = TrainConfig(epochs=3, batch_size=16, checkpoint_every=1, device="cpu", channels_last=False)
    trainer = Trainer(Encoder(TINY), cfg, images, files=train_files(tmp_path), progress=False)
    real_loss, calls = trainer.loss_fn, {"n": 0}

    class Poisoned(torch.nn.Module):  # a loss module, as the trainer checkpoints the loss's state too
        def forward(self, z1, z2, labels):
            calls["n"] += 1
            value = real_loss(z1, z2, labels)
            return value * float("nan") if calls["n"] > trainer.plan.steps_per_epoch() else value

    trainer.loss_fn = Poisoned()
    with pytest.raises(TrainingError, match="loss became nan in epoch 2"):
        trainer.train()
    tensors, meta = load_tensors(tmp_path / CHECKPOINT)
    assert meta["epoch"] == 1
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())


def test_training_input_errors():
    with pytest.raises(ValueError, match="uint8"):
        Trainer(Encoder(TINY), TrainConfig(device="cpu"), torch.rand(4, 3, 32, 32), progress=False)
    with pytest.raises(ValueError, match="no training images"):
        Trainer(Encoder(TINY), TrainConfig(device="cpu"), torch.zeros(0, 3, 32, 32, dtype=torch.uint8), progress=False)
    with pytest.raises(ValueError, match="unknown loss"):
        Trainer(Encoder(TINY), TrainConfig(loss="simclr", device="cpu"), torch.zeros(4, 3, 32, 32, dtype=torch.uint8),
                progress=False)
    with pytest.raises(ValueError, match="ID class labels"):
        Trainer(Encoder(TINY), TrainConfig(device="cpu"), torch.zeros(4, 3, 32, 32, dtype=torch.uint8),
                class_labels=torch.tensor([0, 1, -1, 0]), progress=False)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    images = torch.randint(0, 255, (20, 3, 32, 32), dtype=torch.uint8)
    cfg = TrainConfig(epochs=1, batch_size=16, device="cpu", channels_last=False)
    Trainer(Encoder(TINY), cfg, images, files=train_files(tmp_path), progress=False).train()
    other = Trainer(Encoder(ModelConfig(width=8, head_hidden=16, head_layers=1)), cfg, images,
                    files=train_files(tmp_path), progress=False)
    with pytest.raises(ModelFileError, match="another model"):
        other.train(resume=True)


def test_a_resumed_run_counts_the_time_spent_before_it_was_stopped(tmp_path):
    images = torch.randint(0, 255, (20, 3, 32, 32), dtype=torch.uint8)
    cfg = TrainConfig(epochs=3, batch_size=16, device="cpu", channels_last=False, checkpoint_every=1, eval_every=1)

    def slow_then_stopped(model, epoch):
        if epoch == 1:
            time.sleep(1.0)  # the slow part happens before the stop
        if epoch == 2:
            raise KeyboardInterrupt  # after epoch 1's checkpoint, before epoch 2's
        return {}

    with pytest.raises(KeyboardInterrupt):
        Trainer(Encoder(TINY), cfg, images, files=train_files(tmp_path), evaluate=slow_then_stopped,
                progress=False).train()
    resumed = Trainer(Encoder(TINY), cfg, images, files=train_files(tmp_path), progress=False)
    resumed.train(resume=True)
    assert resumed.seconds_before_resume >= 1.0
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]
    assert resumed.seconds >= resumed.seconds_before_resume + sum(r["seconds"] for r in resumed.history[2:])


def test_the_learning_curve_never_changes_training():
    """Evaluating every epoch (in eval mode, drawing no training randomness) leaves the losses and the
    weights exactly as a run without a curve: curves measure, they never steer."""
    images = torch.randint(0, 255, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    def curve(model, epoch):
        model.eval()
        with torch.no_grad():
            model(images[:8].float() / 255)
        return {"probe": 0.0}

    runs = []
    for every in (0, 1):
        cfg = TrainConfig(epochs=3, batch_size=16, device="cpu", channels_last=False, eval_every=every)
        torch.manual_seed(0)
        trainer = Trainer(Encoder(TINY), cfg, images, evaluate=curve, progress=False)
        model = trainer.train()
        runs.append(([r["loss"] for r in trainer.history if "loss" in r], model.state_dict()))
    (losses_plain, weights_plain), (losses_curve, weights_curve) = runs
    assert losses_plain == losses_curve
    assert all(torch.equal(weights_plain[k], weights_curve[k]) for k in weights_plain)


TOTAL = 200  # steps: 200 epochs of one batch


@pytest.fixture(scope="module")
def lrs():
    """The learning rate after each step of a Trainer built with the paper's training settings."""
    paper = preset("paper")
    train = dataclasses.replace(paper.train, epochs=TOTAL, device="cpu", checkpoint_every=0)
    model = dataclasses.replace(paper.model, width=8, head_hidden=16, head_layers=1)
    images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)  # 8 images x 4 variants = one batch of 32
    trainer = Trainer(Encoder(model), train, images, progress=False)
    assert trainer.plan.steps_per_epoch() == 1
    out = [trainer.scheduler.get_last_lr()[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(TOTAL - 1):
            trainer.optimizer.step()
            trainer.scheduler.step()
            out.append(trainer.scheduler.get_last_lr()[0])
    return out


def _one_cycle(step: int, peak: float, warm: float) -> float:
    """OneCycleLR's schedule written out (cosine annealing, PyTorch's defaults otherwise): from
    peak / 25 up to the peak over the warm-up share, then down to peak / 25 / 1e4."""
    start, end, warm_steps = peak / 25, peak / 25 / 1e4, warm * TOTAL - 1
    if step <= warm_steps:
        return start + (peak - start) * (1 - math.cos(math.pi * step / warm_steps)) / 2
    t = (step - warm_steps) / (TOTAL - 1 - warm_steps)
    return end + (peak - end) * (1 + math.cos(math.pi * t)) / 2


def test_warmup_is_one_percent(lrs):
    peak = preset("paper").train.lr
    assert preset("paper").train.warmup == 0.01
    assert lrs[1] == pytest.approx(peak, rel=1e-6)  # the peak is reached after 1 % of training
    assert lrs[20] == pytest.approx(_one_cycle(20, peak, 0.01), rel=1e-6)  # 10 %: already annealing
    assert lrs[20] < peak * 0.99
