"""Command line: `jpq demo | train | index | search | eval` (also `python -m jpq ...`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path


from .encoders import DEFAULT_MODEL

log = logging.getLogger("jpq")


def _common(p, data_required: bool = True):
    p.add_argument("--data", required=data_required,
                   help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/) or a BEIR name"
                        + ("" if data_required else "; without it the demo generates a small synthetic one in OUT/data"))
    p.add_argument("--model", default=DEFAULT_MODEL, help="sentence-transformers model (default: %(default)s)")
    p.add_argument("--embeddings", default=None,
                   help="precomputed embeddings.npz (keys corpus, queries, corpus_ids, query_ids); "
                        "default: a validated <data>-*/embeddings.npz sibling, else computed and cached")
    p.add_argument("--cache", default=None, help="cache folder (default: $JPQ_CACHE or ~/.cache/jpq)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_args(p, skip=()):
    from .train import TrainConfig

    for f in fields(TrainConfig):
        if f.name == "mode" or f.name in skip:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                           help=f"training: {f.name} (default: %(default)s)")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default,
                           help=f"training: {f.name} (default: %(default)s)")


def _config(args, **over):
    from .train import TrainConfig

    kw = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    kw.update(over)
    return TrainConfig(**kw)


def _bounded(kind, low, high=None, what=None):
    """An argparse type: `kind` within [low, high], checked when the command line is parsed,
    before any data is loaded or embedded."""
    what = what or (f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value >= low if kind is int else value > low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


POSITIVE_INT = _bounded(int, 1)
NBITS = _bounded(int, 1, 8)
RATIO = _bounded(float, 1.0, what="a compression ratio > 1")


def _workspace(args, need_train: bool = True):
    from .pipeline import DEFAULT_CACHE, load_workspace

    return load_workspace(args.data, args.model, args.embeddings,
                          Path(args.cache) if args.cache else DEFAULT_CACHE, progress=not args.quiet,
                          device=getattr(args, "device", "cpu"),  # --device: train and demo (TrainConfig)
                          need_train=need_train)


def _floats(text: str, flag: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def cmd_demo(args):
    ratios = [float(r) if "." in r else int(r) for r in args.ratios.split(",")]
    t0 = time.perf_counter()
    out = Path(args.out)
    if args.data is None:
        from .data import make_synthetic_beir

        args.data = str(out / "data")
        if not (out / "data" / "corpus.jsonl").exists():
            make_synthetic_beir(out / "data", seed=args.seed)
        print(f"no --data: generated a synthetic BEIR folder in {args.data}")
    ws = _workspace(args)
    if args.index == "tree":
        from .tree import run_tree_demo

        records = run_tree_demo(ws.dataset, ws.doc_emb, ws.query_emb, out, seed=args.seed, progress=not args.quiet)
        print(json.dumps(records, indent=1))
    else:
        from .demo import results_table, run_demo

        lrs = _floats(args.centroid_lrs, "--centroid-lrs")
        weights = _floats(args.pseudo_query_weights, "--pseudo-query-weights")
        records = run_demo(ws, out, ratios=ratios, config=_config(args, mode="jpq"), seed=args.seed,
                           progress=not args.quiet, centroid_lrs=lrs, pseudo_query_weights=weights)
        print(results_table(records, ws.dataset.name))
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; results in {out}/results.json")


def cmd_index(args):
    from .pipeline import build_index, m_for_ratio

    ws = _workspace(args, need_train=False)
    M = args.M if args.M is not None else m_for_ratio(ws.d, args.ratio, args.nbits)
    index = build_index(ws.doc_emb, M, opq=args.opq, nbits=args.nbits, seed=args.seed,
                        anisotropic_eta=args.anisotropic_eta, unit_norm=args.unit_norm)
    index.save(args.out)
    print(f"{index} -> {args.out}")


def cmd_train(args):
    from .pipeline import build_index, m_for_ratio, selection_summary, train_run

    ws = _workspace(args)
    out = Path(args.out)
    if args.index == "tree":
        from .tree import train_tree_cli

        train_tree_cli(ws, out, seed=args.seed, progress=not args.quiet, resume=args.resume)
        return
    index = None
    if args.mode != "encoder":
        M = args.M if args.M is not None else m_for_ratio(ws.d, args.ratio)
        index = build_index(ws.doc_emb, M, opq=True, seed=args.seed, unit_norm=args.unit_norm)
    cfg = _config(args)
    trainer, secs, selection = train_run(ws, cfg, index, out, resume=args.resume, progress=not args.quiet)
    if index is not None:
        trainer.trained_index().save(out / "index.jpq")
    if trainer.encoder is not None and args.mode != "centroids":
        trainer.encoder.model.save(str(out / "query-encoder"))
    summary = selection_summary(selection, trainer)
    print(json.dumps({"seconds": round(secs, 1), **summary, "history": selection.history,
                      **({"refit_history": trainer.state.history} if summary["refit"] else {})}, indent=1))


def _load_queries(args, ws):
    from .encoders import SentenceEncoder

    ids = ws.test_ids()
    rows = ws.query_rows(ids)
    if args.encoder:
        enc = SentenceEncoder(args.encoder)
        q = enc.encode([ws.dataset.query_texts[i] for i in rows])
    else:
        q = ws.query_emb[rows]
    return ids, q


def cmd_eval(args):
    from .index import PQIndex
    from .pipeline import evaluate_vectors

    ws = _workspace(args, need_train=False)
    ids, q = _load_queries(args, ws)
    index = PQIndex.load(args.index) if args.index else None
    print(json.dumps(evaluate_vectors(ws, q, index, ids), indent=1))


def cmd_search(args):
    from .encoders import SentenceEncoder
    from .index import PQIndex

    index = PQIndex.load(args.index)
    if args.data and index.ids is not None:
        raise ValueError(f"{args.index} holds its own ids (added with add_with_ids), which search prints; --data "
                         "maps the positions of an index without ids to the corpus' document ids")
    enc = SentenceEncoder(args.encoder or args.model)
    q = enc.encode(args.query)
    D, I = index.search(q, args.k)
    doc_ids = None
    if args.data:
        from .data import load_beir

        doc_ids = load_beir(args.data).corpus_ids
        if len(doc_ids) != index.ntotal:
            raise ValueError(f"--data has {len(doc_ids)} documents but the index holds {index.ntotal}: "
                             f"not the corpus it was built from")
    for text, d, i in zip(args.query, D, I):
        print(f"query: {text}")
        for rank, (s, row) in enumerate(zip(d, i), 1):
            if row >= 0:
                print(f"  {rank:3d}. {doc_ids[row] if doc_ids else row}\t{s:.4f}")


def build_parser():
    # no abbreviated flags: `--pseudo-query-weight` must not quietly become the demo's `--pseudo-query-weights`
    p = argparse.ArgumentParser(prog="jpq", description="PQ kernels and JPQ training for dense retrieval",
                                allow_abbrev=False)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", allow_abbrev=False, help="the quality-vs-compression table on a BEIR folder")
    _common(d, data_required=False)
    d.add_argument("--out", required=True)
    d.add_argument("--ratios", default="16,32,64,96", help="compression ratios (default: %(default)s)")
    d.add_argument("--index", choices=("pq", "tree"), default="pq")
    d.add_argument("--centroid-lrs", default="0.0001,0.001",
                   help="centroid learning rates tried on held-out validation (default: %(default)s)")
    d.add_argument("--pseudo-query-weights", default="0,1",
                   help="pseudo-query weights tried with each rate on held-out validation; 0 = off "
                        "(default: %(default)s)")
    _train_args(d, skip=("lr_centroids", "pseudo_query_weight"))  # the demo chooses these
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", allow_abbrev=False, help="JPQ training (or the tree index with --index tree)")
    _common(t)
    t.add_argument("--out", required=True)
    t.add_argument("--mode", choices=("jpq", "centroids", "encoder"), default="jpq")
    t.add_argument("--index", choices=("pq", "tree"), default="pq")
    t.add_argument("--M", type=POSITIVE_INT, default=None, help="sub-quantizers (default: from --ratio)")
    t.add_argument("--ratio", type=RATIO, default=32)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--unit-norm", action="store_true", help="score reconstructions rescaled to unit norm (for unit-norm embeddings; jpq.PQIndex unit_norm)")
    _train_args(t)
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("index", allow_abbrev=False, help="build a (post-hoc) PQ/OPQ index of the corpus")
    _common(i)
    i.add_argument("--out", required=True)
    i.add_argument("--M", type=POSITIVE_INT, default=None, help="sub-quantizers (default: from --ratio and --nbits)")
    i.add_argument("--ratio", type=RATIO, default=32)
    i.add_argument("--nbits", type=NBITS, default=8)
    i.add_argument("--opq", action="store_true")
    i.add_argument("--anisotropic-eta", type=float, default=1.0,
                   help="refit codebooks and codes to the anisotropic (score-aware) loss with this weight "
                        "on the error along each vector (default: %(default)s = plain k-means)")
    i.add_argument("--unit-norm", action="store_true", help="score reconstructions rescaled to unit norm (for unit-norm embeddings; jpq.PQIndex unit_norm)")
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=cmd_index)

    e = sub.add_parser("eval", allow_abbrev=False, help="test-split metrics of an index (exact search without --index)")
    _common(e)
    e.add_argument("--index", default=None)
    e.add_argument("--encoder", default=None, help="a trained query encoder folder (from jpq train)")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("search", allow_abbrev=False, help="search an index with query texts")
    s.add_argument("--index", required=True)
    s.add_argument("--query", action="append", required=True)
    s.add_argument("--k", type=POSITIVE_INT, default=10)
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--encoder", default=None)
    s.add_argument("--data", default=None, help="BEIR folder, to print document ids")
    s.set_defaults(func=cmd_search)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    try:
        args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # say what, not where (OSError: a missing
        # file, a folder where a file was expected, no permission)
        if args.verbose:
            raise
        print(f"jpq {args.func.__name__.removeprefix('cmd_')}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
