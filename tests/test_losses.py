"""The loss family against an independent, row-by-row reading of the formulas in docs/method.md."""
import math

import pytest
import torch
import torch.nn.functional as F

from firm import FIRMLoss, NTXentLoss, SupConLoss
from firm.losses import OUTLIER_LABEL, batch_labels, build_loss, masked_softmax_loss, resolve_mode

OUT = OUTLIER_LABEL


def positives_concat(labels, rule):
    """P(i) for the concat layout, written out per row as docs/method.md states it."""
    n = len(labels)
    y = list(labels) * 2
    sets = []
    for i in range(2 * n):
        pair = i + n if i < n else i - n
        if rule == "ntxent" or (rule == "firm" and y[i] == OUT):
            sets.append({pair})
        else:
            sets.append({j for j in range(2 * n) if j != i and y[j] == y[i]})
    return sets


def reference_concat(z1, z2, labels, rule, tau):
    z = torch.cat([z1, z2]).double()
    total = 0.0
    for i, pos in enumerate(positives_concat(labels, rule)):
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(len(z)) if k != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in pos) / len(pos)
    return total / len(z)


def reference_pairwise(z1, z2, labels, rule, tau):
    n = len(labels)
    total = 0.0
    for i in range(n):
        if rule == "ntxent" or (rule == "firm" and labels[i] == OUT):
            pos = [i]
        else:
            pos = [j for j in range(n) if labels[j] == labels[i]]
        denom = sum(math.exp(float(z1[i] @ z2[k]) / tau) for k in range(n))
        total += -sum(math.log(math.exp(float(z1[i] @ z2[p]) / tau) / denom) for p in pos) / len(pos)
    return total / n


def random_batch(n, d=16, seed=0, dtype=torch.float64, n_classes=3):
    g = torch.Generator().manual_seed(seed)
    z1 = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    z2 = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    labels = torch.randint(-1, n_classes, (n,), generator=g)
    labels[0], labels[1] = 0, OUT  # at least one inlier and one outlier
    return z1, z2, labels


LOSSES = {"firm": lambda t, m: FIRMLoss(tau=t, mode=m), "ntxent": lambda t, m: NTXentLoss(tau=t, mode=m),
          "supcon": lambda t, m: SupConLoss(tau=t, mode=m)}


@pytest.mark.parametrize("rule", ["firm", "ntxent", "supcon"])
@pytest.mark.parametrize("mode", ["concat", "pairwise"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_row_by_row_formula(rule, mode, seed):
    z1, z2, labels = random_batch(12, seed=seed)
    tau = [0.2, 0.5, 0.07][seed]
    loss = LOSSES[rule](tau, mode)(z1, z2, labels)
    ref = (reference_concat if mode == "concat" else reference_pairwise)(z1, z2, labels.tolist(), rule, tau)
    assert abs(float(loss) - ref) <= 1e-10 * max(1.0, abs(ref))


@pytest.mark.parametrize("tau", [0.2, 0.01])  # 0.01: too small for one shared shift in float32
def test_float32_matches_formula(tau):
    z1, z2, labels = random_batch(40, d=32, seed=5, dtype=torch.float32)
    ref = reference_concat(z1, z2, labels.tolist(), "firm", tau)
    assert abs(float(FIRMLoss(tau=tau)(z1, z2, labels)) - ref) <= 1e-5 * abs(ref)


def test_worked_example_through_the_loss():
    """The loss's own positive sets, read off its groups, are the worked example's."""
    labels = torch.tensor([1, 2, 2, OUT, OUT])
    loss_fn = FIRMLoss(tau=0.2)
    groups = loss_fn.positive_groups(labels)
    g2 = torch.cat([groups, groups]).tolist()
    positives = lambda i: {j for j in range(10) if j != i and g2[j] == g2[i]}
    assert positives(1) == {2, 6, 7}
    assert positives(3) == {8}
    assert positives(0) == {5}  # label 1 appears once: its only positive is its second view
    assert positives(9) == {4}
    z1, z2, _ = random_batch(5, seed=3)
    ref = reference_concat(z1, z2, labels.tolist(), "firm", 0.2)
    assert abs(float(loss_fn(z1, z2, labels)) - ref) < 1e-9


def test_inlier_positives_include_both_views_of_every_other_inlier():
    labels = torch.tensor([1, 1, 1, OUT, OUT])
    groups = FIRMLoss().positive_groups(labels)
    g2 = torch.cat([groups, groups]).tolist()
    assert {j for j in range(10) if j != 0 and g2[j] == g2[0]} == {1, 2, 5, 6, 7}


def test_losses_differ_only_in_positive_masks():
    """With the same groups, every loss computes the same value: the core is shared."""
    z1, z2, labels = random_batch(10, seed=7)
    firm_groups = FIRMLoss().positive_groups(labels)
    # SupCon fed with FIRM's groups as labels is FIRM.
    assert torch.allclose(SupConLoss()(z1, z2, firm_groups), FIRMLoss()(z1, z2, labels))
    # FIRM with every sample an outlier is NT-Xent; SupCon with unique labels is NT-Xent.
    all_out = torch.full_like(labels, OUT)
    assert torch.allclose(FIRMLoss()(z1, z2, all_out), NTXentLoss()(z1, z2, labels))
    assert torch.allclose(SupConLoss()(z1, z2, torch.arange(10)), NTXentLoss()(z1, z2))


# tau 0.002 in float64 is too small for one shared softmax shift and takes the row-wise path;
# n 600 makes the symmetric backward run in more than one row block.
@pytest.mark.parametrize("n, tau, norm", [(8, 0.2, 1.0), (8, 0.2, 3.0), (8, 0.002, 1.0), (600, 0.2, 1.0)])
def test_loss_gradients_match_dense_reference(n, tau, norm):
    z1, z2, labels = random_batch(n, seed=11)
    z1, z2 = ((norm * z).requires_grad_(True) for z in (z1, z2))
    FIRMLoss(tau=tau)(z1, z2, labels).backward()
    # Dense reference with autograd: explicit masks over the 2N x 2N matrix.
    a1, a2 = z1.detach().clone().requires_grad_(True), z2.detach().clone().requires_grad_(True)
    z = torch.cat([a1, a2])
    logits = z @ z.T / tau
    eye = torch.eye(2 * n, dtype=torch.bool)
    logp = logits.masked_fill(eye, float("-inf")).log_softmax(1)
    pos = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for i, s in enumerate(positives_concat(labels.tolist(), "firm")):
        pos[i, list(s)] = True
    loss = -(logp.masked_fill(~pos, 0).sum(1) / pos.sum(1)).mean()
    loss.backward()
    assert torch.allclose(z1.grad, a1.grad, rtol=1e-9, atol=1e-10 / tau)
    assert torch.allclose(z2.grad, a2.grad, rtol=1e-9, atol=1e-10 / tau)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_batch_is_finite_and_close(dtype):
    z1, z2, labels = random_batch(2048, d=64, seed=2, dtype=torch.float32)
    full = FIRMLoss(tau=0.05)(z1, z2, labels)
    half = FIRMLoss(tau=0.05)(z1.to(dtype), z2.to(dtype), labels)
    assert torch.isfinite(half)
    assert abs(float(half) - float(full)) < 0.05 * float(full)


def test_row_without_positive_raises():
    z = F.normalize(torch.randn(4, 8), dim=1)
    with pytest.raises(ValueError, match="no positive"):
        masked_softmax_loss(z, z, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]), 0.2, torch.arange(4))


def test_misaligned_views_and_bad_labels_raise():
    z1, z2, labels = random_batch(6)
    with pytest.raises(ValueError, match="same shape"):
        FIRMLoss()(z1, z2[:5], labels)
    with pytest.raises(ValueError, match="one label per sample"):
        FIRMLoss()(z1, z2, labels[:5])
    with pytest.raises(ValueError, match="neither ID class ids"):
        FIRMLoss()(z1, z2, torch.tensor([0, 1, -3, -1, 0, 0]))
    with pytest.raises(ValueError, match="integers"):
        FIRMLoss()(z1, z2, labels.float())


def test_custom_outlier_label():
    z1, z2, labels = random_batch(9, seed=4)
    relabelled = torch.where(labels == OUT, torch.tensor(99), labels)
    assert torch.allclose(FIRMLoss(outlier_label=99)(z1, z2, relabelled), FIRMLoss()(z1, z2, labels))


def test_batch_labels_per_loss():
    classes = torch.tensor([0, 0, 0, 0])
    variant = torch.tensor([0, 1, 2, 3])
    assert batch_labels("firm", classes, variant).tolist() == [0, OUT, OUT, OUT]
    assert batch_labels("supcon", classes, variant).tolist() == [0, -1, -1, -1]
    assert batch_labels("rotsupcon", classes, variant).tolist() == [0, -1, -2, -3]
    assert isinstance(build_loss("rotsupcon"), SupConLoss)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("triplet")


def test_supcon_labels_keep_several_id_classes_apart():
    """With several ID classes, SupCon and Rot-SupCon keep each class its own positive group
    (not one group for every inlier); outliers form one group (SupCon) or one per transform."""
    classes = torch.tensor([0, 1, 2, 0, 1, 2])
    variant = torch.tensor([0, 0, 0, 1, 2, 1])
    for name, outlier_groups in (("supcon", [[3, 4, 5]]), ("rotsupcon", [[3, 5], [4]])):
        labels = batch_labels(name, classes, variant)
        groups = build_loss(name).positive_groups(labels).tolist()
        same = lambda i, j, groups=groups: groups[i] == groups[j]
        assert not same(0, 1) and not same(1, 2) and not same(0, 2)
        assert not any(same(i, j) for i in range(3) for j in range(3, 6))
        for members in outlier_groups:
            assert all(same(members[0], j) for j in members)
        if name == "rotsupcon":
            assert not same(3, 4)


def test_authors_layouts():
    """The authors ran FIRM and NT-Xent in the N x N pairwise layout, SupCon and Rot-SupCon in
    the 2N x 2N one; "authors" selects those, an explicit layout overrides them."""
    authors = {"firm": "pairwise", "ntxent": "pairwise", "supcon": "concat", "rotsupcon": "concat"}
    assert {name: resolve_mode(name, "authors") for name in authors} == authors
    assert build_loss("firm", mode="authors").mode == "pairwise"
    assert build_loss("supcon", mode="authors").mode == "concat"
    assert build_loss("firm", mode="concat").mode == "concat"
    with pytest.raises(ValueError, match="layout"):
        build_loss("firm", mode="diagonal")
