"""Fused straight-through quantize-and-score: gradcheck on the reference (and the float64 CPU
path); every path against the reference in the forward and in dq, dC and dx."""
import numpy as np
import pytest
import torch

from jpq.kernels.assign import assign_reference
from jpq.kernels.ste import quantize_and_score
from kernel_cases import backend_params, shrink
from tolerances import assert_close

FAST_BACKENDS = [p for p in backend_params() if p.id != "reference"]
MODES = ["codes", "codes+x", "assign", "pairs"]


def make_problem(seed, B, N, M, K, ds, P=None, dtype=torch.float32, near=False):
    """Random q (B, D), centroids (M, K, ds), codes (N, M) uint8, x (N, D), doc_index (B, P).

    near=True puts every x sub-vector within 1e-3 of the centroid `codes` picks, so that
    assignment inside gives back `codes` on every path (no near-ties between float32 and
    float64 distances); the test checks that precondition against the reference encoder.
    """
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((M, K, ds))
    codes = rng.integers(0, K, (N, M)).astype(np.uint8)
    if near:
        x = C[np.arange(M)[None, :], codes].reshape(N, M * ds) + 1e-3 * rng.standard_normal((N, M * ds))
        np.testing.assert_array_equal(assign_reference(x, C), codes)
    else:
        x = rng.standard_normal((N, M * ds))
    q = rng.standard_normal((B, M * ds))
    idx = rng.integers(0, max(N, 1), (B, P)) if P is not None else None
    t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    return t(q), t(C), torch.from_numpy(codes), t(x), None if idx is None else torch.from_numpy(idx)


def mode_kwargs(mode, codes, x, idx):
    """quantize_and_score keyword arguments for a mode."""
    if mode == "codes":
        return dict(codes=codes)
    if mode == "codes+x":  # codes used, x feeds the recon error and the straight-through dx
        return dict(codes=codes, x=x, return_recon_error=True)
    if mode == "assign":
        return dict(x=x, return_recon_error=True)
    return dict(codes=codes, x=x, doc_index=idx, return_recon_error=True)  # "pairs"


def run(backend, metric, q, C, x, kwargs, seed=0):
    """Forward + backward of a random linear loss; returns the outputs and the gradients."""
    q = q.clone().requires_grad_(True)
    C = C.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    kwargs = {k: (x if k == "x" else v) for k, v in kwargs.items()}
    out = quantize_and_score(q, C, metric=metric, backend=backend, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    wrt = [q, C] + ([x] if "x" in kwargs else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * len(wrt)
    grads = [torch.zeros_like(w) if gr is None else gr for gr, w in zip(grads, wrt)]
    return [o.detach() for o in outs], grads


def scale_of(t):
    return max(1.0, float(t.abs().max())) if t.numel() else 1.0


# --------------------------------------------------------------------------- gradcheck
GC_SHAPE = dict(B=3, N=5, M=2, K=3, ds=2, P=4)


def gradcheck_case(backend, metric, mode, seed):
    q, C, codes, x, idx = make_problem(seed, dtype=torch.float64, near=(mode == "assign"), **GC_SHAPE)
    kwargs = mode_kwargs(mode, codes, x, idx)  # x enters as a constant: its dx is straight-through

    def f(q, C):
        return quantize_and_score(q, C, metric=metric, backend=backend, **kwargs)

    assert torch.autograd.gradcheck(f, (q.requires_grad_(), C.requires_grad_()), eps=1e-6, atol=1e-7)

    if "x" in kwargs:  # the recon error is a true function of x (codes fixed or piecewise constant)
        def g(x):
            return quantize_and_score(q.detach(), C.detach(), metric=metric, backend=backend,
                                      **{**kwargs, "x": x})[1]

        assert torch.autograd.gradcheck(g, (x.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_reference(metric, mode):
    gradcheck_case("reference", metric, mode, seed=11)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_cpu_float64(metric, mode):
    # the CPU path keeps float64 inputs in float64 (numba kernels are dtype-generic)
    gradcheck_case("cpu", metric, mode, seed=12)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("pairs", [False, True], ids=["all-pairs", "pairs"])
def test_reference_dx_is_straight_through(metric, pairs):
    # dx = dL/dx_hat from the scores + 2 gr (x - x_hat): autograd of the textbook STE
    # formulation x_ste = x_hat + (x - x.detach()) in plain torch (float64) gives exactly that
    q, C, codes, x, idx = make_problem(3, B=4, N=6, M=3, K=5, ds=2, P=5 if pairs else None,
                                       dtype=torch.float64)
    got = run("reference", metric, q, C, x, dict(codes=codes, x=x, doc_index=idx, return_recon_error=True))

    q, C, x = (t.clone().requires_grad_() for t in (q, C, x))
    x_hat = C[torch.arange(3)[None, :], codes.long()].reshape(6, 6)
    x_ste = x_hat + (x - x.detach())
    docs = x_ste[None].expand(4, 6, 6) if idx is None else x_ste[idx]
    s = (torch.einsum("bd,bpd->bp", q, docs) if metric == "ip" else ((q[:, None] - docs) ** 2).sum(-1))
    recon = ((x - x_hat) ** 2).sum(-1)
    gen = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in (s, recon))
    want = torch.autograd.grad(loss, (q, C, x))
    for a, b in zip(got[0] + got[1], [s.detach(), recon.detach(), *want]):
        assert_close(a, b, dtype=np.float64, reduction_length=24)


# --------------------------------------------------------------------------- paths vs reference
# (B, N, M, K, ds, P): one of everything (M=1, ds=1, B=1, N=1), odd sizes (M=3, K=7, ds=5),
# the benchmark's subspaces (M=96, K=256, ds=8) with B=70 > QUERIES_PER_TILE (two query tiles
# on the CPU path), no documents, no queries.
SHAPES = [
    (1, 1, 1, 7, 1, 1),
    (3, 17, 3, 7, 5, 4),
    (5, 33, 8, 16, 3, 9),
    (70, 40, 96, 256, 8, 11),
    (4, 0, 2, 4, 2, 0),
    (0, 5, 2, 4, 2, 3),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,N,M,K,ds,P", SHAPES)
def test_matches_reference(backend, metric, mode, B, N, M, K, ds, P):
    B = shrink(B, backend, cap=6)
    N = shrink(N, backend, cap=24)
    if mode == "assign":  # the interpreted assign kernel walks K in chunks per subspace: slow
        M = shrink(M, backend, cap=12)
    q, C, codes, x, idx = make_problem(B * 7 + N + M, B, N, M, K, ds, P, near=(mode == "assign"))
    kwargs = mode_kwargs(mode, codes, x, idx)
    (outs, grads) = run(backend, metric, q, C, x, kwargs)
    (outs_ref, grads_ref) = run("reference", metric, q, C, x, kwargs)
    D = M * ds
    n_pairs = N if idx is None else P
    # reduction lengths (x2 where l2 adds a second term): scores and the recon error sum D
    # products; dq sums over a query's documents; dC[m, k] over the (query, document) pairs
    # whose document has code k; dx over the queries
    if N == 0:
        per_code = 1
    elif idx is None:
        per_code = B * max(np.bincount(codes[:, m].numpy(), minlength=K).max() for m in range(M))
    else:
        docs = codes[idx.reshape(-1)].numpy()
        per_code = max(np.bincount(docs[:, m], minlength=K).max() for m in range(M))
    names = ["scores", "recon"][: len(outs)] + ["dq", "dC", "dx"][: len(grads)]
    lengths = [D, D][: len(outs)] + [2 * max(n_pairs, 1), 2 * per_code, 2 * B][: len(grads)]
    for name, a, b, n in zip(names, outs + grads, outs_ref + grads_ref, lengths):
        assert a.dtype == torch.float32, name
        assert_close(a, b, reduction_length=n, scale=scale_of(b), msg=f"{name} ({backend})")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_codes_win_over_x(backend):
    # with both codes and x, the scores use the codes (not x's nearest centroids)
    q, C, codes, x, _ = make_problem(5, B=3, N=9, M=4, K=8, ds=2)
    with_x = quantize_and_score(q, C, codes=codes, x=x, backend=backend)
    only = quantize_and_score(q, C, codes=codes, backend=backend)
    assigned = quantize_and_score(q, C, x=x, backend=backend)
    assert_close(with_x, only, reduction_length=8)
    assert not torch.allclose(with_x, assigned)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_only_requested_gradients(backend):
    # C frozen, x without grad: only dq is computed, and x gets none
    q, C, codes, x, _ = make_problem(6, B=3, N=9, M=4, K=8, ds=2)
    q.requires_grad_()
    s, r = quantize_and_score(q, C, codes=codes, x=x, return_recon_error=True, backend=backend)
    (s.sum() + r.sum()).backward()
    assert C.grad is None and x.grad is None and q.grad is not None
    ref = quantize_and_score(q, C, codes=codes, backend="reference")
    (dq_ref,) = torch.autograd.grad(ref.sum(), q)
    assert_close(q.grad, dq_ref, reduction_length=18, scale=scale_of(dq_ref))


def test_auto_is_cpu_on_cpu(monkeypatch):
    from jpq.kernels import ste

    calls = []
    real = ste._CpuOps.scores
    monkeypatch.setattr(ste._CpuOps, "scores", staticmethod(lambda *a: calls.append(1) or real(*a)))
    q, C, codes, _, _ = make_problem(7, B=2, N=3, M=2, K=4, ds=2)
    quantize_and_score(q, C, codes=codes)
    assert calls == [1]


def test_float64_stays_float64_on_cpu():
    q, C, codes, x, _ = make_problem(8, B=2, N=3, M=2, K=4, ds=2, dtype=torch.float64)
    s, r = quantize_and_score(q, C, codes=codes, x=x, return_recon_error=True, backend="cpu")
    assert s.dtype == r.dtype == torch.float64


# --------------------------------------------------------------------------- bad inputs
def bad_cases():
    q, C, codes, x, idx = make_problem(9, B=2, N=3, M=2, K=4, ds=2, P=2)
    nan_q = q.clone()
    nan_q[0, 0] = float("nan")
    return [
        (dict(q=q, centroids=C), ValueError, "got neither"),
        (dict(q=q, centroids=C, codes=codes.clone().fill_(4)), ValueError, r"codes values must lie in \[0, 4\)"),
        (dict(q=q, centroids=C, codes=codes.float()), TypeError, "codes must be an integer"),
        (dict(q=q, centroids=C, codes=codes[:, :1]), ValueError, "expected M=2"),
        (dict(q=q[:, :3], centroids=C, codes=codes), ValueError, "q has dimension 3"),
        (dict(q=q, centroids=C, x=x[:, :3]), ValueError, "x has dimension 3"),
        (dict(q=nan_q, centroids=C, codes=codes), ValueError, "q contains NaN"),
        (dict(q=q, centroids=C, codes=codes, x=x[:2]), ValueError, "x has 2 rows but codes has 3"),
        (dict(q=q, centroids=C, codes=codes, return_recon_error=True), ValueError, "needs x"),
        (dict(q=q, centroids=C.double(), codes=codes), TypeError, "centroids has dtype torch.float64"),
        (dict(q=q.numpy(), centroids=C.numpy(), codes=codes.numpy()), TypeError, "pass torch tensors"),
        (dict(q=q, centroids=C.numpy(), codes=codes), TypeError, "all NumPy arrays or all torch"),
        (dict(q=q, centroids=C, codes=codes, doc_index=idx + 3), ValueError, r"doc_index values must lie in \[0, 3\)"),
        (dict(q=q, centroids=C, codes=codes, doc_index=idx[:1]), ValueError, "doc_index has 1 rows"),
        (dict(q=q, centroids=C, codes=codes, doc_index=idx.float()), TypeError, "doc_index must be an integer"),
        (dict(q=q, centroids=C, codes=codes, metric="cos"), ValueError, "metric must be one of"),
        (dict(q=q, centroids=C, codes=codes, backend="gpu"), ValueError, "backend must be one of"),
        (dict(q=q, centroids=C[:, :0], codes=codes), ValueError, "all sizes >= 1"),
    ]


@pytest.mark.parametrize("case", range(len(bad_cases())))
def test_bad_inputs_raise(case):
    kwargs, exc, match = bad_cases()[case]
    with pytest.raises(exc, match=match):
        quantize_and_score(**kwargs)


VALUE_CASES = ("codes values must lie", "q contains NaN", "doc_index values must lie")


@pytest.mark.parametrize("case", range(len(bad_cases())))
def test_check_false_skips_only_the_value_checks(case):
    """check=False (what JPQTrainer passes: each value check waits for a CUDA device) skips the
    NaN and range scans and nothing else: every other bad input is refused as before; a NaN
    query just scores NaN."""
    kwargs, exc, match = bad_cases()[case]
    if any(v in match for v in VALUE_CASES):
        if "q contains NaN" in match:
            assert torch.isnan(quantize_and_score(**kwargs, check=False)[0]).any()
        return  # out-of-range codes or doc_index would read outside the tensors: not called
    with pytest.raises(exc, match=match):
        quantize_and_score(**kwargs, check=False)


@pytest.mark.skipif(torch.cuda.device_count() == 0, reason="needs a CUDA device")
def test_mixed_devices_raise():
    q, C, codes, _, _ = make_problem(10, B=2, N=3, M=2, K=4, ds=2)
    with pytest.raises(ValueError, match="different devices"):
        quantize_and_score(q.cuda(), C, codes=codes)


@pytest.mark.interpreter
@pytest.mark.parametrize("B,N,M,K", [(70, 200, 2, 3), (3, 130, 1, 256), (5, 64, 3, 1), (2, 65, 2, 2), (4, 0, 2, 3)])
def test_all_pairs_grad_table_sums_runs_of_codes_exactly(B, N, M, K):
    """The Triton all-pairs table G[b, m, k] = sum of g[b, n] over codes[n, m] = k, built from the
    documents in code order with one atomic per run of equal codes in a 64-document tile: runs
    longer than a tile (K = 1, 2, 3), runs cut by tile ends (N = 65, 130), more than one block of
    64 queries (B = 70), a single run per subspace (K = 1), no documents."""
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    from jpq.kernels import ste_triton

    gen = torch.Generator().manual_seed(B + N + M + K)
    g = torch.randn((B, N), generator=gen)
    codes = torch.randint(0, K, (N, M), generator=gen).to(torch.uint8)
    onehot = torch.nn.functional.one_hot(codes.long(), K).double()  # (N, M, K)
    want = torch.einsum("bn,nmk->mbk", g.double(), onehot)
    got = ste_triton.grad_table(g, codes, None, M, K)
    assert got.shape == (M, B, K)
    assert_close(got, want, reduction_length=max(N, 1), scale=float(g.abs().max()) if N else 1.0)
    plan = ste_triton.grad_table_plan(codes, K)  # as the backward passes it, shared by its tiles
    assert torch.equal(ste_triton.grad_table(g, codes, None, M, K, plan), got)
