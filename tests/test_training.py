"""firm.training: the batch plan (which image and which variant fills each slot of a batch)."""
import pytest
import torch

from firm.training import BatchPlan


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
