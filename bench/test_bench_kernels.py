"""pytest-benchmark microbenchmarks of the PQ kernels next to faiss (same data, same threads).

    python -m pytest bench/test_bench_kernels.py --benchmark-group-by=group

Sizes are moderate (N=50k, D=768, M=96) so the suite runs in about a minute; the side-by-side
ratios at N=200k come from bench/compare_faiss.py.
"""
import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from jpq.kernels import adc_topk, assign, build_lut  # noqa: E402

N, D, M, K = 50_000, 768, 96, 256


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    C = rng.standard_normal((M, K, D // M)).astype(np.float32)
    codes = rng.integers(0, K, (N, M), dtype=np.uint8)
    index = faiss.IndexPQ(D, M, 8, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(C.ravel(), index.pq.centroids)
    index.is_trained = True
    faiss.copy_array_to_vector(codes.ravel(), index.codes)
    index.ntotal = N
    x = rng.standard_normal((20_000, D)).astype(np.float32)
    return C, codes, index, x


@pytest.mark.parametrize("nq", [1, 4, 8, 64])  # 4 and 8: the four-query scans
def test_bench_adc_topk_jpq(benchmark, problem, nq):
    C, codes, _, _ = problem
    benchmark.group = f"search nq={nq}"
    q = np.random.default_rng(1).standard_normal((nq, D)).astype(np.float32)
    D_, I = benchmark(lambda: adc_topk(build_lut(q, C), codes, 10, check=False))
    assert I.shape == (nq, 10)


@pytest.mark.parametrize("nq", [1, 4, 8, 64])  # 4 and 8: the four-query scans
def test_bench_adc_topk_faiss(benchmark, problem, nq):
    _, _, index, _ = problem
    benchmark.group = f"search nq={nq}"
    q = np.random.default_rng(1).standard_normal((nq, D)).astype(np.float32)
    D_, I = benchmark(lambda: index.search(q, 10))
    assert I.shape == (nq, 10)


def test_bench_assign_jpq(benchmark, problem):
    C, _, _, x = problem
    benchmark.group = "encode 20k"
    assert benchmark(lambda: assign(x, C)).shape == (len(x), M)


def test_bench_assign_faiss(benchmark, problem):
    C, _, index, x = problem
    benchmark.group = "encode 20k"
    assert benchmark(lambda: index.pq.compute_codes(x)).shape == (len(x), M)
