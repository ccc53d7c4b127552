"""Synthetic outliers (the transforms and their registry) and the batched views."""
import pytest
import torch

from firm.shifts import (AUTO, SHIFTS, CutPaste, CutPasteScar, HorizontalFlip, Mixup, PatchPermutation, Rotation,
                         Scramble, Shift, ShiftSet, _beta, build_shifts)
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


def _zeros(n):
    return torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize("shift", [CutPaste(), CutPasteScar(), Scramble(), Mixup(), PatchPermutation(2), PatchPermutation(4)],
                         ids=lambda s: s.name)
def test_random_shifts_change_images_and_are_seeded(shift):
    x = images(16, size=32)
    out = shift(x, _zeros(16), torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (out != x).flatten(1).any(1).all()  # a shift that does nothing makes no outlier
    assert torch.equal(out, shift(x, _zeros(16), torch.Generator().manual_seed(1)))
    assert not torch.equal(out, shift(x, _zeros(16), torch.Generator().manual_seed(2)))
    if isinstance(shift, (PatchPermutation, Scramble)):
        # cells are moved, turned or flipped: every image keeps exactly its multiset of values
        assert torch.equal(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    grey = shift(images(4, c=1, size=32), _zeros(4), torch.Generator().manual_seed(0))
    assert grey.shape == (4, 1, 32, 32) and grey.min() >= 0 and grey.max() <= 1


def _changed_box(before, after):
    """(top, left, height, width) of the pixels that differ, or None."""
    rows = torch.nonzero((before != after).any(0).any(1)).flatten()
    cols = torch.nonzero((before != after).any(0).any(0)).flatten()
    if len(rows) == 0:
        return None
    return rows[0].item(), cols[0].item(), (rows[-1] - rows[0] + 1).item(), (cols[-1] - cols[0] + 1).item()


def _copied_from_same_image(image, region, atol=0.0):
    """Whether ``region`` (C, h, w) equals a window of ``image`` somewhere."""
    windows = image.unfold(1, region.shape[1], 1).unfold(2, region.shape[2], 1)  # C, H', W', h, w
    return bool(((windows - region[:, None, None]).abs().amax((0, 3, 4)) <= atol).any())


def test_cutpaste_copies_a_rectangle_of_the_authors_size_from_the_same_image():
    x = images(40, size=32)
    out = CutPaste()(x, _zeros(40), torch.Generator().manual_seed(0))
    for before, after in zip(x, out):
        top, left, h, w = _changed_box(before, after)
        assert (before != after).any(0).sum() == h * w  # the changed pixels are one full rectangle
        # area 2-15% of the image, up to the rounding of each side to whole pixels
        assert 0.02 * 1024 - 0.5 * (h + w) - 1 <= h * w <= 0.15 * 1024 + 0.5 * (h + w) + 1
        assert 1 / 3.3 - 0.2 <= h / w <= 3.3 + 1.5
        assert _copied_from_same_image(before, after[:, top:top + h, left:left + w])


def test_cutpaste_probability_leaves_that_share_of_outliers_unchanged():
    x = images(2000, c=1, size=16)
    def unchanged(shift):
        out = shift(x, _zeros(2000), torch.Generator().manual_seed(0))
        return (out == x).flatten(1).all(1).float().mean().item()
    # The authors' outliers are always pasted (their data.py passes p=1.0); their class default is 0.5.
    assert unchanged(CutPaste()) == 0 and unchanged(CutPasteScar()) == 0
    assert abs(unchanged(CutPaste(p=0.5)) - 0.5) < 0.1  # 2000 draws: the standard error is 0.011
    assert abs(unchanged(CutPasteScar(p=0.5)) - 0.5) < 0.1
    assert unchanged(CutPaste(p=0.0)) == 1


def test_scar_sizes_are_in_pixels_and_the_scar_comes_from_the_same_image():
    straight = CutPasteScar(angle=(0.0, 0.0), jitter=(0.0, 0.0, 0.0, 0.0))
    for size in (32, 128):  # pixel sizes do not scale with the image
        x = images(30, size=size)
        out = straight(x, _zeros(30), torch.Generator().manual_seed(3))
        for before, after in zip(x, out):
            top, left, h, w = _changed_box(before, after)
            assert 10 <= h <= 25 and 2 <= w <= 16  # length 10-25 px (vertical before turning), width 2-16 px
            assert _copied_from_same_image(before, after[:, top:top + h, left:left + w], atol=1e-5)


def test_turned_scars_stay_within_their_rotated_bounds():
    x = images(60, size=64)
    out = CutPasteScar()(x, _zeros(60), torch.Generator().manual_seed(4))
    extent = (16 + 25) / 2 ** 0.5 + 2  # the widest bounding box of a 16 x 25 px patch turned by up to 45 degrees
    areas = []
    for before, after in zip(x, out):
        top, left, h, w = _changed_box(before, after)
        assert h <= extent and w <= extent
        areas.append((before != after).any(0).sum().item())
    assert max(areas) <= 17 * 26 + 2 * (17 + 26) and min(areas) >= 2 * 10
    assert out.min() >= 0 and out.max() <= 1


def _cells(x, n=4):
    b, c, h, w = x.shape
    s = h // n
    return x.reshape(b, c, n, s, n, s).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, s, s)


def _turns(cell):
    return [torch.rot90(cell, 1, (-2, -1)), torch.rot90(cell, 2, (-2, -1)), torch.rot90(cell, 3, (-2, -1)),
            cell.flip(-1), cell]


def test_scramble_turns_each_cell_one_of_five_ways_uniformly():
    x = images(200, size=16)
    out = Scramble(shuffle_p=0.0)(x, _zeros(200), torch.Generator().manual_seed(0))
    counts = torch.zeros(5)
    for before, after in zip(_cells(x), _cells(out)):
        for cell_in, cell_out in zip(before, after):
            match = [torch.equal(cell_out, t) for t in _turns(cell_in)]
            assert sum(match) == 1  # in place, turned or flipped
            counts[match.index(True)] += 1
    assert ((counts / counts.sum() - 0.2).abs() < 0.05).all()  # 3200 cells: the standard error is 0.007


def test_scramble_shuffles_one_run_of_consecutive_cells():
    x = images(100, size=16)
    out = Scramble(shuffle_p=1.0)(x, _zeros(100), torch.Generator().manual_seed(1))
    moved_any = 0
    for before, after in zip(_cells(x), _cells(out)):
        moved = [i for i in range(16) if not any(torch.equal(after[i], t) for t in _turns(before[i]))]
        if not moved:
            continue
        moved_any += 1
        lo, hi = moved[0], moved[-1] + 1
        # cells outside the run stay where they were; inside it they are a permutation of the run
        sort = lambda cells: sorted(c.flatten().sort().values.tolist() for c in cells)
        assert sort(after[lo:hi]) == sort(before[lo:hi])
    assert moved_any > 50


def test_scramble_cells_follow_the_authors_rounding_and_need_square_cells():
    x = images(4, size=30)  # cells of 7 px: a 2 px border is left as it is
    out = Scramble()(x, _zeros(4), torch.Generator().manual_seed(0))
    assert torch.equal(out[..., 28:, :], x[..., 28:, :]) and torch.equal(out[..., :, 28:], x[..., :, 28:])
    with pytest.raises(ValueError, match="square cells"):
        Scramble()(torch.rand(2, 3, 32, 64), _zeros(2))


def test_mixup_blends_each_image_with_another_image_of_the_batch():
    x = images(300, size=8)
    out = Mixup()(x, _zeros(300), torch.Generator().manual_seed(0))
    a, b, o = x.flatten(1)[:, None], x.flatten(1)[None], out.flatten(1)[:, None]
    d = a - b  # (i, j): image i minus candidate partner j
    lam = ((o - b) * d).sum(-1) / d.square().sum(-1).clamp(min=1e-12)
    residual = (o - b - lam[..., None] * d).norm(dim=-1)
    residual.fill_diagonal_(float("inf"))
    partner = residual.argmin(1)
    i = torch.arange(300)
    assert (partner != i).all() and (residual[i, partner] < 1e-4).all()
    weights = lam[i, partner]
    assert weights.min() >= -1e-4 and weights.max() <= 1 + 1e-4
    assert abs(weights.mean().item() - 0.5) < 0.1


def test_beta_draws_follow_beta_04_04():
    from scipy import stats
    draws = _beta(0.4, 0.4, 5000, torch.zeros(1), torch.Generator().manual_seed(0))
    assert draws.min() >= 0 and draws.max() <= 1
    assert stats.kstest(draws.numpy(), stats.beta(0.4, 0.4).cdf).pvalue > 1e-4


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
    # with OE, Rot-SupCon sees one outlier label (whatever its value), distinct from the inliers'
    outlier_labels = set(labels[~inlier].tolist())
    assert len(outlier_labels) == 1 and not outlier_labels & set(labels[inlier].tolist())


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


def test_registry_lists_every_shift_with_a_one_line_description():
    assert set(SHIFTS) >= {"rotation", "hflip", "cutpaste", "cutpaste_scar", "scramble", "mixup", "permutation"}
    assert AUTO in SHIFTS.choices and AUTO not in SHIFTS  # a choice, resolved from the images: no shift of its own
    for name, entry in SHIFTS.items():
        factory, description = entry  # name -> (factory, description)
        assert description and "\n" not in description
        shift = factory()
        assert isinstance(shift, Shift) and shift.name == name


@pytest.mark.parametrize("name", list(SHIFTS))
def test_every_registered_shift_builds_and_runs_on_a_batch(name):
    shifts = build_shifts(name)
    assert isinstance(shifts, ShiftSet) and shifts.names == [name]
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    variant = torch.arange(8) % (shifts.num_variants + 1)
    out = shifts(x, variant, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out[variant == 0], x[variant == 0])  # variant 0 is the inlier, left alone
    assert not torch.equal(out[variant > 0], x[variant > 0])


def test_build_shifts_reads_lists_and_comma_strings():
    assert build_shifts("rotation, cutpaste").names == ["rotation", "cutpaste"]
    assert build_shifts(["mixup", "scramble"]).num_variants == 2
    assert build_shifts("rotation,cutpaste_scar").num_variants == 4


def test_unknown_shift_names_the_choices():
    with pytest.raises(ValueError, match="unknown shift.*'rotate'") as error:
        build_shifts(["rotate"])
    for name in SHIFTS:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="at least one shift"):
        build_shifts("")


def test_auto_must_be_resolved_before_building():
    for names in ("auto", ["rotation", "auto"]):
        with pytest.raises(ValueError, match="auto.*choose_shifts"):
            build_shifts(names)
