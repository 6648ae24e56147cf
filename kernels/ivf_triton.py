"""Triton path of `ivf_search`: each query's probed lists are laid out as one padded row of list
rows, scored by the ADC gather kernel of adc_triton.py with (query, candidate) pairs, and ranked
by torch sorts on the device.

    rows[q, :]   = the list rows of q's probed lists, in probe order (padding past valid[q])
    scores[q, p] = sum_m lut[q, m, list_codes[rows[q, p], m]]          (`launch_gather`, PAIRS)
    top-k        = the k best valid entries, ties by the smaller document id (list_ids[rows])

The look-up tables are `build_lut`'s Triton-path tables (a batched GEMM on the device), built per
chunk of queries. Queries are taken in chunks whose padded (queries x candidates) block holds at
most SCORES_PER_CHUNK entries, so memory stays bounded when some query probes long lists: about
40 bytes per entry at the peak (int64 rows, ids and sort orders beside the float32 scores), so
2**24 entries are some 700 MB. Kept apart from ivf.py so
that `import jpq` never needs triton; ivf.py imports this lazily.
"""
from __future__ import annotations

import torch

from .adc import _build_lut_torch
from .adc_triton import launch_gather
from .arrays import FLOAT_MAX

# padded (query, candidate) entries per chunk of queries (see the module docstring for the bytes)
SCORES_PER_CHUNK = 1 << 24


def probed_lengths(offsets: torch.Tensor, probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first rows, lengths) of each probe's list, both (nq, w) int64; 0 and 0 for a -1 probe."""
    ok = probes >= 0
    lists = probes.clamp_min(0)
    starts = offsets[lists]
    lens = torch.where(ok, offsets[lists + 1] - starts, torch.zeros_like(starts))
    return starts, lens


def candidate_rows(starts: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's probed lists' rows concatenated in probe order, padded to the longest.

    Args:
        starts, lens: shape=(nq, w) int64: first row and length of each probed list (length 0 for
            none), as `probed_lengths` gives them.

    Returns:
        rows: shape=(nq, P) int64, P = the largest per-query total; padding entries are row 0.
        valid: shape=(nq, P) bool, True on the entries that are real candidates.
    """
    nq, w = lens.shape
    dev = lens.device
    per_query = lens.sum(1)
    P = int(per_query.max()) if nq else 0
    flat_lens = lens.reshape(-1)
    total = int(flat_lens.sum())
    probe_of = torch.repeat_interleave(torch.arange(nq * w, device=dev), flat_lens)  # (total,)
    seg_first = torch.repeat_interleave(torch.cumsum(flat_lens, 0) - flat_lens, flat_lens)
    within = torch.arange(total, device=dev) - seg_first  # position inside its list
    col = (torch.cumsum(lens, 1) - lens).reshape(-1)[probe_of] + within  # position in its query's row
    rows = torch.zeros((nq, P), dtype=torch.int64, device=dev)
    rows[probe_of // w, col] = starts.reshape(-1)[probe_of] + within
    valid = torch.arange(P, device=dev)[None, :] < per_query[:, None]
    return rows, valid


def _query_chunks(per_query: list[int]) -> list[tuple[int, int]]:
    """Consecutive query ranges whose padded score block (count x longest) fits SCORES_PER_CHUNK
    (a single query always forms a range, however long its lists)."""
    chunks, start, longest = [], 0, 0
    for i, n in enumerate(per_query):
        if i > start and max(longest, n) * (i + 1 - start) > SCORES_PER_CHUNK:
            chunks.append((start, i))
            start, longest = i, 0
        longest = max(longest, n)
    if per_query:
        chunks.append((start, len(per_query)))
    return chunks


def rank_candidates(scores: torch.Tensor, valid: torch.Tensor, doc: torch.Tensor, k: int,
                    largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(k, P) best valid entries of each row of scores (B, P), best first, ties by the
    smaller document id doc (B, P) int64; invalid entries come last, as (-FLT_MAX or +FLT_MAX, -1)."""
    doc = torch.where(valid, doc, torch.full_like(doc, torch.iinfo(torch.int64).max))
    key = torch.where(valid, scores if largest else -scores, torch.full_like(scores, -torch.inf))
    by_id = torch.argsort(doc, dim=1, stable=True)  # then stably by key: ties keep the id order
    order = torch.gather(by_id, 1, torch.argsort(torch.gather(key, 1, by_id), dim=1, descending=True,
                                                 stable=True))[:, :k]
    got = torch.gather(valid, 1, order)
    fill = -FLOAT_MAX if largest else FLOAT_MAX
    D = torch.where(got, torch.gather(scores, 1, order),
                    torch.full(order.shape, fill, dtype=torch.float32, device=order.device))
    I = torch.where(got, torch.gather(doc, 1, order), torch.full_like(order, -1))
    return D, I


def ivf_search_triton(q: torch.Tensor, centroids: torch.Tensor, list_codes: torch.Tensor,
                      offsets: torch.Tensor, ids: torch.Tensor, probes: torch.Tensor, k: int,
                      metric: str = "ip") -> tuple[torch.Tensor, torch.Tensor]:
    """k best documents of each query's probed lists (see ivf.py's docstring for the contract).

    Args:
        q: shape=(nq, D), float32; centroids: shape=(M, K, ds), float32, D = M * ds.
        list_codes: shape=(N', M), uint8, values < K, rows in list order.
        offsets: shape=(n_lists + 1,) int64; ids: shape=(N',) int64; probes: shape=(nq, w) int64,
            -1 for none. All on one device (CUDA, or the CPU under TRITON_INTERPRET=1), contiguous,
            checked by the caller.

    Returns:
        D: shape=(nq, k) float32, best first; I: shape=(nq, k) int64, -1 (and -FLT_MAX for "ip",
        +FLT_MAX for "l2") past the scanned documents.
    """
    nq = q.shape[0]
    dev = q.device
    largest = metric == "ip"
    D = torch.full((nq, k), -FLOAT_MAX if largest else FLOAT_MAX, dtype=torch.float32, device=dev)
    I = torch.full((nq, k), -1, dtype=torch.int64, device=dev)
    if nq == 0:
        return D, I
    starts, lens = probed_lengths(offsets, probes)
    for c0, c1 in _query_chunks(lens.sum(1).tolist()):
        rows, valid = candidate_rows(starts[c0:c1], lens[c0:c1])
        if rows.shape[1] == 0:
            continue
        scores = torch.empty(rows.shape, dtype=torch.float32, device=dev)
        launch_gather(_build_lut_torch(q[c0:c1], centroids, metric), list_codes, rows, scores)
        d, i = rank_candidates(scores, valid, ids[rows], k, largest)
        D[c0:c1, : d.shape[1]] = d
        I[c0:c1, : i.shape[1]] = i
    return D, I


__all__ = ["ivf_search_triton", "candidate_rows", "probed_lengths", "rank_candidates"]
