"""Synthetic outliers, batch composition and the batched views."""
import pytest
import torch

from firm.shifts import BatchPlan, CutPaste, HorizontalFlip, PatchPermutation, Rotation, ShiftSet, build_shifts
from firm.views import ViewAugment, color_jitter, gaussian_blur, random_resized_crop


def images(n=6, c=3, size=8, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_four_quarter_turns_give_back_the_image():
    x = images()
    rot = Rotation(angles=(90,))
    y = x
    for _ in range(4):
        y = rot(y, torch.zeros(len(x), dtype=torch.long))
    assert torch.equal(y, x)


def test_rotation_variants_are_90_180_270():
    x = images(3)
    out = Rotation()(x, torch.tensor([0, 1, 2]))
    for i, k in enumerate((1, 2, 3)):
        assert torch.equal(out[i], torch.rot90(x[i], k, dims=(-2, -1)))


def test_shift_set_leaves_inliers_and_numbers_variants_from_one():
    x = images(5)
    shifts = ShiftSet([Rotation(), HorizontalFlip()])
    assert shifts.num_variants == 4
    out = shifts(x, torch.tensor([0, 1, 2, 3, 4]))
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], torch.rot90(x[1], 1, dims=(-2, -1)))
    assert torch.equal(out[3], torch.rot90(x[3], 3, dims=(-2, -1)))
    assert torch.equal(out[4], x[4].flip(-1))


@pytest.mark.parametrize("shift", [CutPaste(), CutPaste(scar=True), PatchPermutation(2), PatchPermutation(4)])
def test_patch_shifts_change_images_but_keep_their_pixels_plausible(shift):
    x = images(16, size=32)
    g = torch.Generator().manual_seed(1)
    out = shift(x, torch.zeros(16, dtype=torch.long), g)
    assert out.shape == x.shape
    changed = (out != x).flatten(1).any(1)
    assert changed.float().mean() > 0.8  # a shift that does nothing makes no outlier
    if isinstance(shift, PatchPermutation):
        # a permutation moves pixels: every image keeps exactly its multiset of values
        assert torch.equal(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    else:
        # cut-paste copies pixels from the same image: pasted values exist in the source image
        assert all(torch.isin(out[i], x[i]).all() for i in range(16))


def test_build_shifts_names_and_errors():
    assert build_shifts("rotation,cutpaste").names == ["rotation", "cutpaste"]
    with pytest.raises(ValueError, match="unknown shift"):
        build_shifts(["rotate"])
    with pytest.raises(ValueError):
        Rotation(angles=(45,))


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


def test_random_resized_crop_full_scale_is_identity():
    x = images(4, size=16)
    out = random_resized_crop(x, 16, scale=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-5)


def test_crop_output_size_and_range():
    x = images(4, size=32)
    out = random_resized_crop(x, 24, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 24, 24)
    assert out.min() >= 0 and out.max() <= 1


def test_color_jitter_zero_strength_is_identity_and_hue_full_turn():
    x = images(4)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(color_jitter(x, 0, 0, 0, 0, generator=g), x)
    from firm.views import _shift_hue
    assert torch.allclose(_shift_hue(x, torch.zeros(4)), x, atol=1e-5)
    assert torch.allclose(_shift_hue(x, torch.ones(4)), x, atol=1e-5)


def test_hue_shift_matches_a_known_colour():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    from firm.views import _shift_hue
    green = _shift_hue(red, torch.tensor([1 / 3]))
    assert torch.allclose(green.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)


def test_blur_keeps_constant_images_and_probability_zero_is_identity():
    const = torch.full((2, 3, 8, 8), 0.3)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(gaussian_blur(const, p=1.0, generator=g), const, atol=1e-6)
    x = images(3)
    assert torch.allclose(gaussian_blur(x, p=0.0, generator=g), x)


def test_views_are_random_but_seeded():
    x = images(8, size=32)
    aug = ViewAugment()
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape


def test_grey_images_get_views_too():
    x = images(4, c=1, size=32)
    out = ViewAugment()(x, torch.Generator().manual_seed(0))
    assert out.shape == (4, 1, 32, 32)


def _trainer(images, **kwargs):
    from firm.models import Encoder, ModelConfig
    from firm.training import TrainConfig, Trainer
    cfg = TrainConfig(batch_size=16, epochs=1, device="cpu", **kwargs.pop("config", {}))
    return Trainer(Encoder(ModelConfig(width=4, head_hidden=16, head_layers=1)), cfg, images, progress=False, **kwargs)


def test_outlier_exposure_fills_outlier_slots_with_auxiliary_images():
    dark = torch.zeros(20, 3, 32, 32, dtype=torch.uint8)
    bright = torch.full((50, 3, 32, 32), 255, dtype=torch.uint8)
    trainer = _trainer(dark, auxiliary=bright, config={"loss": "rotsupcon"})
    index, variant = trainer.plan.epoch(0)
    trainer.seed_epoch(0)
    views, labels = trainer.make_batch(index[0], variant[0])
    brightness = views[:16].mean((1, 2, 3))
    inlier = variant[0] == 0
    assert (brightness[inlier] < 0.2).all() and (brightness[~inlier] > 0.5).all()
    assert set(labels.tolist()) <= {0, 1}  # with OE, Rot-SupCon sees one outlier label


def test_training_with_patch_shifts_runs_and_labels_outliers():
    images = torch.randint(0, 255, (24, 3, 32, 32), dtype=torch.uint8)
    trainer = _trainer(images, config={"shifts": "cutpaste,permutation,cutpaste_scar"})
    assert trainer.shifts.num_variants == 3
    index, variant = trainer.plan.epoch(0)
    trainer.seed_epoch(0)
    views, labels = trainer.make_batch(index[0], variant[0])
    assert views.shape == (32, 3, 32, 32)
    assert ((labels == -1) == (variant[0] > 0)).all()
    assert torch.isfinite(trainer.step(index[0], variant[0]))
