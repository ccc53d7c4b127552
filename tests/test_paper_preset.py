"""The `paper` preset holds the authors' training schedule and layouts (the other authors' values
are pinned where they live: test_models.py, test_eval_settings.py, test_losses.py)."""
import dataclasses
import math
import warnings

import pytest
import torch

from firm.config import preset
from firm.losses import AUTHORS_MODE
from firm.models import Encoder
from firm.training import Trainer

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


def test_paper_trains_in_float32_with_the_authors_optimiser_and_layouts():
    t = preset("paper").train
    assert (t.amp, t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs, t.tau) == (False, 0.01, 0.9, 3e-4, 32, 2000, 0.2)
    assert t.loss_mode == AUTHORS_MODE  # each loss in its authors' layout (test_losses.py pins which)
