"""Scorers on synthetic Gaussian features whose right ranking is known, and the SVMs' nu setting;
metrics on hand-made curves."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from firm.config import EvalConfig, preset
from firm.evaluation import aulc, auroc, epochs_to_reach, evaluate_scorers
from firm.features import TTA_MODES, FeatureSet
from firm.models import Encoder, ModelConfig
from firm.scoring import SCORERS, apply_scorers, build_scorer, fit_scorers, knn_similarity, scorer_names, score


def gaussian_features(seed=0, d=32, n_bank=400, n_query=200):
    g = torch.Generator().manual_seed(seed)
    normal_dir = F.normalize(torch.randn(d, generator=g), dim=0)
    other_dir = F.normalize(torch.randn(d, generator=g), dim=0)
    bank = 3 * normal_dir + 0.3 * torch.randn(n_bank, d, generator=g)
    normal = 3 * normal_dir + 0.3 * torch.randn(n_query, d, generator=g)
    anomalous = 3 * other_dir + 0.3 * torch.randn(n_query, d, generator=g)
    queries = torch.cat([normal, anomalous])
    y = torch.cat([torch.zeros(n_query), torch.ones(n_query)]).long()
    return bank, queries, y


@pytest.mark.parametrize("name", list(SCORERS))
def test_every_scorer_ranks_a_far_cluster_as_anomalous(name):
    bank, queries, y = gaussian_features()
    s = build_scorer(name).fit(bank).score(queries)
    assert s.shape == (len(queries),)
    assert auroc(s, y) > 0.95


@pytest.mark.parametrize("name", ["ocsvm_rbf", "ocsvm_linear"])
def test_svms_rank_well_with_the_old_nu_too(name):
    bank, queries, y = gaussian_features()
    svm = build_scorer(name, EvalConfig(ocsvm_nu=0.1)).fit(bank)
    assert svm.svm_.nu == 0.1
    assert auroc(svm.score(queries), y) > 0.95


def test_registries_are_dicts_with_descriptions():
    assert list(TTA_MODES) == ["none", "angled", "ensemble"] and "angled" in TTA_MODES
    assert all(entry.description for entry in TTA_MODES.values())
    assert all(entry.description for entry in SCORERS.values())
    assert scorer_names(["cos1", "all"]) == list(SCORERS)
    assert scorer_names(["kde", "cos1", "kde"]) == ["kde", "cos1"]
    with pytest.raises(ValueError, match="unknown scorer"):
        scorer_names(["cos2"])
    with pytest.raises(ValueError, match="unknown scorer"):
        build_scorer("nope")


def test_cos1_of_a_bank_point_is_minus_one_and_cos5_averages_top5():
    bank, _, _ = gaussian_features(n_bank=50)
    s1 = build_scorer("cos1").fit(bank).score(bank[:3])
    assert torch.allclose(s1, -torch.ones(3), atol=1e-5)
    nb = F.normalize(bank, dim=1)
    q = F.normalize(torch.randn(4, bank.shape[1]), dim=1)
    expected = -(q @ nb.T).topk(5, dim=1).values.mean(1)
    assert torch.allclose(build_scorer("cos5").fit(bank).score(q), expected, atol=1e-5)


def test_cos_norm_scales_by_the_query_norm():
    bank, queries, _ = gaussian_features()
    plain = build_scorer("cos1").fit(bank).score(queries)
    normed = build_scorer("cos1_norm").fit(bank).score(queries)
    assert torch.allclose(normed, plain * queries.norm(dim=1), atol=1e-4)


def test_mahalanobis_weighs_low_variance_directions_more():
    g = torch.Generator().manual_seed(0)
    d = 8
    bank = torch.zeros(2000, d)
    bank[:, 0] = 10.0
    bank[:, 1] = 0.5 * torch.randn(2000, generator=g)    # wide direction
    bank[:, 2] = 0.05 * torch.randn(2000, generator=g)   # narrow direction
    bank[:, 3:] = 0.05 * torch.randn(2000, d - 3, generator=g)
    along_wide = torch.zeros(1, d)
    along_wide[0, 0], along_wide[0, 1] = 10.0, 1.0
    along_narrow = torch.zeros(1, d)
    along_narrow[0, 0], along_narrow[0, 2] = 10.0, 1.0
    m = build_scorer("mahalanobis").fit(bank)
    assert m.score(along_narrow) > m.score(along_wide)


def test_kde_prefers_dense_regions():
    bank, _, _ = gaussian_features()
    kde = build_scorer("kde").fit(bank)
    center = bank.mean(0, keepdim=True)
    outlier = -center
    assert kde.score(center) < kde.score(outlier)


def test_knn_similarity_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    q = F.normalize(torch.randn(40, 16, generator=g), dim=1)
    assert torch.allclose(knn_similarity(bank, q, 5), (q @ bank.T).topk(5, dim=1).values, atol=1e-5)


def test_ensemble_averages_over_rotations_and_crops():
    bank, queries, y = gaussian_features()
    b = FeatureSet(torch.stack([bank, bank * 2]).unsqueeze(1))              # 2 rotations, 1 "crop"
    q = FeatureSet(torch.stack([torch.stack([queries, queries])] * 2))      # 2 rotations, 2 crops
    single = score("cos1", FeatureSet(bank.view(1, 1, *bank.shape)), FeatureSet(queries.view(1, 1, *queries.shape)))
    assert torch.allclose(score("cos1", b, q), single, atol=1e-5)
    with pytest.raises(ValueError, match="rotations"):
        apply_scorers(fit_scorers("cos1", b), FeatureSet(queries.view(1, 1, *queries.shape)))


def test_score_passes_the_config_to_the_scorers():
    bank, queries, _ = gaussian_features(n_bank=200, n_query=50)
    b, q = FeatureSet(bank.view(1, 1, *bank.shape)), FeatureSet(queries.view(1, 1, *queries.shape))
    assert fit_scorers("ocsvm_rbf", b, EvalConfig(ocsvm_nu=0.2))[0].svm_.nu == 0.2
    low, high = score("ocsvm_rbf", b, q, EvalConfig(ocsvm_nu=0.05)), score("ocsvm_rbf", b, q, EvalConfig(ocsvm_nu=0.9))
    assert not torch.allclose(low, high)




def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return Encoder(ModelConfig(width=4, head_hidden=16, head_layers=1, head_out=8))


def _tiny_images(n, seed):
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_evaluate_scorers_all_and_a_stored_bank():
    model = _tiny_model()
    normal, test = _tiny_images(12, 0), _tiny_images(10, 1)
    y = torch.tensor([0, 1] * 5)
    config = EvalConfig(ensemble_crops=2)
    records, scores = evaluate_scorers(model, normal, test, y, ["all"], ["none", "angled", "ensemble"], config=config)
    assert [(r["scorer"], r["tta"]) for r in records] == [(s, t) for t in TTA_MODES for s in SCORERS]
    assert all(0 <= r["auroc"] <= 1 for r in records)
    # A bank stored at 4 rotations gives the same scores as extracting it again, for every ensemble.
    from firm.features import extract_features
    stored = extract_features(model, normal, "angled", query=False, config=config)
    _, stored_scores = evaluate_scorers(model, stored, test, y, ["cos1", "kde"], ["none", "angled"], config=config)
    for key, s in stored_scores.items():
        assert torch.allclose(s, scores[key], atol=1e-5), key
    with pytest.raises(ValueError, match="unknown test-time ensemble"):
        evaluate_scorers(model, normal, test, y, ["cos1"], "sideways")


def test_auroc_errors_are_clear():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        auroc(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0.1, np.nan]), np.array([0, 1]))


def test_aulc_on_hand_made_curves():
    assert aulc([0, 1, 2], [1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert aulc([0, 5, 10], [0.0, 0.5, 1.0]) == pytest.approx(0.5)      # a straight line
    assert aulc([0, 1, 2], [0.0, 1.0, 0.0]) == pytest.approx(2 / 3)     # Simpson on a parabola: exact
    assert aulc([0, 10], [0.5, 0.7]) == pytest.approx(0.6)              # two points: trapezoid
    with pytest.raises(ValueError):
        aulc([0, 0, 1], [0.1, 0.2, 0.3])


def test_epochs_to_reach_interpolates():
    assert epochs_to_reach([0, 2, 4], [0.5, 0.7, 0.9], 0.8) == pytest.approx(3.0)
    assert epochs_to_reach([0, 2, 4], [0.5, 0.7, 0.9], 0.5) == 0.0
    assert math.isinf(epochs_to_reach([0, 2], [0.5, 0.6], 0.9))


@pytest.mark.parametrize("name", ["ocsvm_rbf", "ocsvm_linear"])
def test_nu_reaches_scikit_learns_one_class_svm(name):
    g = torch.Generator().manual_seed(0)
    bank = FeatureSet(torch.randn(1, 1, 60, 8, generator=g))
    assert fit_scorers(name, bank)[0].svm_.nu == 0.5                      # EvalConfig(): the authors'
    assert fit_scorers(name, bank, preset("cpu").eval)[0].svm_.nu == 0.1  # the old value
    assert fit_scorers(name, bank, EvalConfig(ocsvm_nu=0.3))[0].svm_.nu == 0.3
