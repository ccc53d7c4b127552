"""Exact kNN (firm.scoring.knn_search): every backend returns what a brute-force top-k returns,
ties included, whichever one knn_backend picks."""
import pytest
import torch
import torch.nn.functional as F

import firm.scoring as scoring
from firm.scoring import KNN_BACKENDS, knn_backend, knn_measurements, knn_search, knn_similarity


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 x 256 similarities, so that small inputs take several query chunks, several
    bank tiles, a padded last tile and the grouped top-k."""
    monkeypatch.setattr(scoring, "_TILE", 64 * 256)
    monkeypatch.setattr(scoring, "_TILE_BANK", 256)
    monkeypatch.setattr(scoring, "_GROUP", 8)


def _normal(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def _integers(rows: int, dim: int, seed: int) -> torch.Tensor:
    """Small integers: every inner product is exact in float32, and many of them are equal."""
    return torch.randint(-2, 3, (rows, dim), generator=torch.Generator().manual_seed(seed)).float()


def _assert_valid_top_k(bank, queries, k, sims, index):
    """``sims`` are exactly the brute-force top-k values and ``index`` names distinct bank rows with
    those similarities: among tied rows any choice is right."""
    reference = (queries @ bank.T).topk(k, dim=1).values
    assert torch.equal(sims, reference)
    assert torch.equal((queries[:, None, :] * bank[index]).sum(-1), sims)
    assert all(len(set(row.tolist())) == k for row in index)


@pytest.mark.parametrize("backend", list(KNN_BACKENDS))
@pytest.mark.parametrize("bank_rows, k", [(1001, 5), (1001, 1), (333, 3), (40, 7), (3, 5)])
def test_every_backend_matches_brute_force(small_tiles, backend, bank_rows, k):
    bank, queries = _normal(bank_rows, 16, 0), _normal(150, 16, 1)
    sims, index = knn_search(bank, queries, k, backend=backend)
    reference = (queries @ bank.T).topk(min(k, bank_rows), dim=1)
    assert sims.shape == index.shape == (150, min(k, bank_rows))
    assert torch.allclose(sims, reference.values, atol=1e-6)
    assert torch.equal(index, reference.indices)  # random data: no two similarities tie


@pytest.mark.parametrize("backend", list(KNN_BACKENDS))
@pytest.mark.parametrize("k", [1, 5])
def test_ties_give_the_exact_values_and_valid_rows(small_tiles, backend, k):
    bank = _integers(700, 6, 2)
    bank = torch.cat([bank, bank[:300]])  # duplicated rows: exact ties across tiles and groups
    queries = _integers(130, 6, 3)
    _assert_valid_top_k(bank, queries, k, *knn_search(bank, queries, k, backend=backend))


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("threads", [1, 3])
def test_blocks_on_any_number_of_threads_match_and_leave_thread_counts_as_they_were(small_tiles, backend, threads):
    from threadpoolctl import threadpool_info
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    try:
        bank, queries = _integers(900, 6, 12), _integers(200, 6, 13)
        _assert_valid_top_k(bank, queries, 5, *knn_search(bank, queries, 5, backend=backend))
        assert torch.get_num_threads() == threads
        assert [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"] == blas
    finally:
        torch.set_num_threads(saved)


def test_default_tiles_on_a_bank_wider_than_one_tile():
    bank, queries = _integers(20_000, 8, 4), _integers(40, 8, 5)
    _assert_valid_top_k(bank, queries, 5, *knn_search(bank, queries, 5, backend="torch"))


def test_float64_and_empty_inputs():
    bank, queries = _normal(500, 8, 6).double(), _normal(20, 8, 7).double()
    sims, index = knn_search(bank, queries, 4)
    assert sims.dtype == torch.float64 and torch.equal(index, (queries @ bank.T).topk(4, dim=1).indices)
    sims, index = knn_search(bank, queries[:0], 4)
    assert sims.shape == index.shape == (0, 4)


def test_knn_similarity_is_the_similarities_of_knn_search():
    bank, queries = _normal(300, 8, 8), _normal(30, 8, 9)
    assert torch.equal(knn_similarity(bank, queries, 3), knn_search(bank, queries, 3)[0])


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="kNN backend"):
        knn_search(_normal(10, 4, 0), _normal(2, 4, 1), 1, backend="annoy")


def test_small_searches_use_torch_without_measuring(monkeypatch):
    monkeypatch.setattr(scoring, "_measured", {})
    assert knn_backend(_normal(100, 8, 0), _normal(10, 8, 1), 5) == "torch"
    assert knn_measurements() == {}


def test_large_searches_measure_every_backend_once(monkeypatch):
    monkeypatch.setattr(scoring, "_measured", {})
    monkeypatch.setattr(scoring, "_MEASURE_ABOVE", 0)
    bank, queries = _normal(2000, 8, 10), _normal(50, 8, 11)
    first = knn_backend(bank, queries, 5)
    measured = knn_measurements()
    assert first in KNN_BACKENDS and set(measured) == set(KNN_BACKENDS)
    assert knn_backend(bank, queries, 5) == first and knn_measurements() == measured  # not measured again
    sims, index = knn_search(bank, queries, 5)
    assert torch.equal(index, (queries @ bank.T).topk(5, dim=1).indices)


@pytest.mark.parametrize("times, chosen", [({"torch": 1.0, "numpy": 0.8, "faiss": 0.9}, "numpy"),
                                           ({"torch": 1.0, "numpy": 1.1, "faiss": 2.0}, "torch")])
def test_the_fastest_measured_backend_is_used(monkeypatch, times, chosen):
    monkeypatch.setattr(scoring, "_measured", times)
    monkeypatch.setattr(scoring, "_MEASURE_ABOVE", 0)
    assert knn_backend(_normal(100, 8, 0), _normal(10, 8, 1), 5) == chosen


def test_other_devices_and_dtypes_use_torch(monkeypatch):
    monkeypatch.setattr(scoring, "_measured", {"torch": 1.0, "faiss": 0.1})
    monkeypatch.setattr(scoring, "_MEASURE_ABOVE", 0)
    assert knn_backend(_normal(100, 8, 0).double(), _normal(10, 8, 1).double(), 5) == "torch"
