"""Machine description and timing helpers shared by the benchmark scripts."""
from __future__ import annotations

import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# ../shared/data beside the project folder: the default --data / --embeddings of the bench scripts
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCIFACT = SHARED_DATA / "scifact"
SCIFACT_MINILM = SHARED_DATA / "scifact-minilm" / "embeddings.npz"


def command_line(script: str, argv: list[str] | None) -> str:
    """How a bench script was invoked, for its report: `python bench/<script> <args>`
    (argv: the arguments given to main, or None for the process's own)."""
    return " ".join([f"python bench/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def set_threads(n: int) -> None:
    """Same thread count for every library in the comparison."""
    import faiss
    import numba
    import torch

    faiss.omp_set_num_threads(n)
    numba.set_num_threads(n)
    torch.set_num_threads(n)


def machine_info(threads: int) -> dict:
    import jpq
    import torch

    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = "-"
    return {
        "cpu": cpu_model(),
        "threads": threads,
        "jpq": jpq.__version__,
        "torch": torch.__version__,
        "faiss": faiss_version,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """Median seconds per function, runs interleaved (a, b, a, b, ...) so drift hits both."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not available")


def append_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        if new:
            w.writeheader()
        w.writerows(rows)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def selection_record(selection, seconds: float, **extra) -> dict:
    """A held-out selection run's record for a report: the selected epoch's held-out score and
    epoch, the mean over its unseen-positive held-out queries (None without the guard), seconds,
    the held-out curve, and `extra` fields (seed, variant, ...). `selection`: a TrainState."""
    unseen = selection.history[selection.best_epoch].get("val_unseen")
    if isinstance(unseen, list):  # epoch 0 keeps the per-query values
        unseen = sum(unseen) / len(unseen)
    return {**extra, "val": float(selection.best_score), "epoch": selection.best_epoch, "val_unseen": unseen,
            "seconds": seconds, "curve": [h.get("val") for h in selection.history]}


def add_selection_row(lines: list[str], records: list[dict], first_cells: str, selection, seconds: float,
                      **extra) -> None:
    """Append a `selection_record` to records and its table row (`| first_cells | ... |`) to
    lines, and print the row."""
    records.append(selection_record(selection, seconds, **extra))
    lines.append(f"| {first_cells} | {selection_cells(records[-1])} |")
    print(lines[-1], flush=True)


def selection_cells(rec: dict) -> str:
    """`val (epoch) | unseen | seconds` table cells of a `selection_record`."""
    unseen = "-" if rec["val_unseen"] is None else f"{rec['val_unseen']:.4f}"
    return f"{rec['val']:.4f} ({rec['epoch']}) | {unseen} | {rec['seconds']:.0f}"


def write_report(out: Path, lines: list[str], records: list, script: str, argv: list[str] | None,
                 started: float) -> None:
    """Close a report with its command line and run time (`started`: time.perf_counter() at the
    start), write it to `out` (markdown) and its records next to it (.json), and print it."""
    import json

    lines = [*lines, "", f"Command: `{command_line(script, argv)}` ({time.perf_counter() - started:.0f} s on "
                         f"{cpu_model()})."]
    out = Path(out)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
    print("\n".join(lines))


def mean_lines(records: list[dict], key: str, title: str) -> list[str]:
    """Report lines: `title`, then per value of rec[key] (first-seen order) the mean of the
    records' "val" and the values themselves."""
    lines = ["", title]
    for value in dict.fromkeys(r[key] for r in records):
        vals = [r["val"] for r in records if r[key] == value]
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        lines.append(f"- {shown}: {statistics.fmean(vals):.4f} ({', '.join(f'{x:.4f}' for x in vals)})")
    return lines


def epoch_states_trainer():
    """A JPQTrainer subclass that keeps every epoch's model state (epoch 0: the start) in
    `epoch_states`, for bench scripts that revisit the epochs of one run."""
    from jpq.train import JPQTrainer

    class EpochStatesKept(JPQTrainer):
        def _initial_record(self):
            self.epoch_states = {0: self._model_state()}
            return super()._initial_record()

        def _close_epoch(self, rec, best_state):
            self.epoch_states[rec["epoch"]] = self._model_state()
            return super()._close_epoch(rec, best_state)

    return EpochStatesKept


def combine_states(states: list[dict], combine) -> dict:
    """One JPQTrainer model state from several of one run's start (same codes, same tower): each
    float tensor (centroids, encoder weights) is `combine(list of that tensor across states)`;
    the codes and integer buffers, which training never changes, are taken from the last state.
    A part that is None in the last state (no trained encoder) stays None."""
    import torch

    def part(values):
        last = values[-1]
        return combine(values) if isinstance(last, torch.Tensor) and last.is_floating_point() else last

    last = states[-1]
    return {"codes": last.get("codes"),
            "centroids": None if last["centroids"] is None else part([s["centroids"] for s in states]),
            "encoder": None if last["encoder"] is None else {
                k: part([s["encoder"][k] for s in states]) for k in last["encoder"]}}


def guard_fields(rec: dict) -> dict:
    """val, unseen_change, unseen_se and eligible of a JPQTrainer epoch record (the unseen guard's
    verdict; an unguarded record is eligible)."""
    return {"val": rec["val"], "unseen_change": rec.get("unseen_change"), "unseen_se": rec.get("unseen_se"),
            "eligible": rec.get("eligible", True)}


def validate_state(trainer, state: dict, epoch: int) -> dict:
    """Load `state` (a JPQTrainer model state) into trainer and score it on the held-out queries as
    epoch `epoch` would be (`guard_fields`; the guard against epoch 0 from epoch 1 on, as in training)."""
    trainer._load_model_state(state)
    rec = {"epoch": epoch, **trainer._validate()}
    return guard_fields(trainer._guard(rec) if epoch else rec)


def add_selection_run_args(ap, stem: str) -> None:
    """The arguments of a script that revisits JPQ's held-out selection runs (`selection_runs`):
    --data, --embeddings, --demo, --ratios, --seeds, --lr-centroids, --pseudo-query-weight, --out
    (default bench/results/STEM[_DATASET].md)."""
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--embeddings", default=None)
    ap.add_argument("--demo", default=str(RESULTS / "demo_scifact"),
                    help="a demo's --out (results.json): its JPQ rows' rate and pseudo-query weight per ratio")
    ap.add_argument("--ratios", default="96")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr-centroids", type=float, default=1e-3)
    ap.add_argument("--pseudo-query-weight", type=float, default=1.0)
    ap.add_argument("--out", default=None, help=f"default: bench/results/{stem}[_DATASET].md")


def demo_choices(demo_dir: str | None) -> dict:
    """{ratio: (lr_centroids, pseudo_query_weight)} of the demo's JPQ full rows."""
    import json

    if not demo_dir:
        return {}
    recs = json.loads((Path(demo_dir) / "results.json").read_text())
    return {int(r["ratio"]): (float(r["lr_centroids"]), float(r.get("pseudo_query_weight", 0.0)))
            for r in recs if r["method"] == "jpq"}


def report_path(args, stem: str, dataset_name: str) -> Path:
    """--out, else bench/results/STEM.md for SciFact and STEM_DATASET.md for another dataset."""
    if args.out:
        return Path(args.out)
    return RESULTS / (f"{stem}.md" if dataset_name == "scifact" else f"{stem}_{dataset_name}.md")


def selection_runs(ws, args, mode: str = "jpq"):
    """Yield (ratio, seed, lr_centroids, pseudo_query_weight, trainer, seconds, selection) for
    each --ratios x --seeds: a held-out selection run (no refit) from an OPQ index with that seed,
    its trainer keeping every epoch's state (`epoch_states_trainer`). Rate and pseudo-query weight
    per ratio are the --demo JPQ rows', else --lr-centroids / --pseudo-query-weight."""
    from jpq.pipeline import build_index, m_for_ratio, train_run
    from jpq.train import TrainConfig

    choices = demo_choices(args.demo)
    trainer_class = epoch_states_trainer()
    for ratio in (int(r) for r in args.ratios.split(",")):
        lr, w = choices.get(ratio, (args.lr_centroids, args.pseudo_query_weight))
        for seed in (int(s) for s in args.seeds.split(",")):
            index = build_index(ws.doc_emb, m_for_ratio(ws.d, ratio), opq=True, seed=seed)
            cfg = TrainConfig(mode=mode, lr_centroids=lr, pseudo_query_weight=w, seed=seed)
            trainer, secs, st = train_run(ws, cfg, index, None, progress=False, select_only=True,
                                          trainer_class=trainer_class)
            yield ratio, seed, lr, w, trainer, secs, st


def add_nested_run_args(ap, stem: str) -> None:
    """The arguments of a nested hold-out script over JPQ full runs (`NestedHoldout`): --data,
    --embeddings, --seeds, --ratio, --lr-centroids and --pseudo-query-weight (the demo's 96x
    choices by default), --cache (bench/results/STEM.json) and --out (bench/results/STEM.md)."""
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--embeddings", default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ratio", type=int, default=96)
    ap.add_argument("--lr-centroids", type=float, default=1e-3)
    ap.add_argument("--pseudo-query-weight", type=float, default=1.0)
    ap.add_argument("--cache", default=str(RESULTS / f"{stem}.json"))
    ap.add_argument("--out", default=str(RESULTS / f"{stem}.md"))


def refit_mean(r: dict, part: str) -> float:
    """The mean of the two refits' (`NestedHoldout.select_and_refit`) outer `part` ("all" or "unseen")."""
    import numpy as np

    return float(np.mean([r["refit"][part], r["refit'"][part]]))


def add_soup_cache_arg(ap, what: str) -> None:
    """--soup-cache: bench/refit_soup_nested.py's runs on the same data, which serve as `what`."""
    ap.add_argument("--soup-cache", default=None,
                    help=f"runs of bench/refit_soup_nested.py on the same data: {what} (default: "
                         "bench/results/refit_soup_nested.json with the default --data and embeddings, else none)")


def read_soup_cache(args) -> dict:
    """The runs --soup-cache names (`add_soup_cache_arg`), defaulting to the committed
    bench/results/refit_soup_nested.json when --data and --embeddings are the defaults (sets
    args.soup_cache to it); {} when there are none."""
    if args.soup_cache is None and args.data == str(SCIFACT) and args.embeddings is None:
        args.soup_cache = str(RESULTS / "refit_soup_nested.json")
    return read_cache(args.soup_cache) if args.soup_cache else {}


def read_default_runs(args) -> dict:
    """JPQ full with the demo's choices, by "s{seed} {ratio}x", each with "from" (its file): the
    --soup-cache runs (`read_soup_cache`), and where that is the committed refit_soup_nested.json,
    for the seeds it lacks, the "one index" runs of the committed opq_restarts_nested.json (the
    same default runs; seeds 0-4). {} when there are none."""
    soup = read_soup_cache(args)
    runs = {}
    if soup and Path(args.soup_cache) == RESULTS / "refit_soup_nested.json":
        restarts = RESULTS / "opq_restarts_nested.json"
        runs = {k: {**r["one index"], "from": restarts.name} for k, r in read_cache(restarts).items()}
    runs.update({k: {**r, "from": Path(args.soup_cache).name} for k, r in soup.items()})
    return runs


def read_cache(path) -> dict:
    """A bench script's JSON cache of finished runs: its contents, or {} when there is none yet."""
    import json

    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def outer_score_rows(res: dict, variants, first_cell: str = "epoch") -> list[str]:
    """Table rows of a nested hold-out report: per run in `res` (key -> record), its `first_cell`
    field and each variant's `NestedHoldout.outer_scores` as "all / unseen" ("-" when missing),
    then their means over the runs that have every variant."""
    import numpy as np

    lines = []
    for key, r in res.items():
        lines.append(f"| {key} | {r[first_cell]} | " + " | ".join(
            f"{r[v]['all']:.4f} / {r[v]['unseen']:.4f}" if v in r else "-" for v in variants) + " |")
    done = [r for r in res.values() if all(v in r for v in variants)]
    if done:
        lines.append(f"| mean ({len(done)}) | | " + " | ".join(
            f"{np.mean([r[v]['all'] for r in done]):.4f} / {np.mean([r[v]['unseen'] for r in done]):.4f}"
            for v in variants) + " |")
    return lines


def write_cached_report(out, lines: list[str], script: str, argv: list[str] | None, started: float, caches: str):
    """Close a report of a script that caches its runs with the command line, this invocation's
    run time (`started`: time.perf_counter() at its start) and where runs were reused from
    (`caches`), write it to `out` and say so."""
    lines = [*lines, "", f"Command: `{command_line(script, argv)}` ({time.perf_counter() - started:.0f} s this "
                         f"invocation on {cpu_model()}; runs reused from {caches} when present)."]
    Path(out).write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


class NestedHoldout:
    """The nested hold-out of the `*_nested.py` bench scripts: the train split's queries that have
    positives, cut into an inner 80% (trained and selected on, as the demo does on a whole split)
    and an outer 20% that is scored (`holdout_split`, `seed`); the test split is never read.
    `ids`: all of them; `outer_unseen`: the outer queries none of whose positives an inner query
    points to. Holds the workspace `ws`, the training `qrels` by document row, the zero-shot
    `query_rows` and, with `pseudo_queries`, the title pseudo-queries."""

    def __init__(self, data, embeddings=None, seed: int = 123, pseudo_queries: bool = True):
        from jpq.pipeline import load_workspace
        from jpq.train import holdout_split

        self.ws = ws = load_workspace(data, embeddings=embeddings, progress=False)
        self.qrels = ws.train_qrels_by_row()
        self.query_rows = dict(zip(ws.dataset.query_ids, ws.query_emb))
        self.ids = [q for q in ws.train_ids() if self.qrels.get(q)]
        self.inner, self.outer = holdout_split(self.ids, self.qrels, 0.2, seed)
        inner_docs = {d for q in self.inner for d in self.qrels[q]}
        self.outer_unseen = [q for q in self.outer if not inner_docs & set(self.qrels[q])]
        self.pseudo = ws.pseudo_query_emb(progress=False) if pseudo_queries else None

    def trainer(self, cfg, index, trainer_class=None, order_seed: int | None = None, encoder: bool = True):
        """A trainer (`trainer_class`, default JPQTrainer) of `cfg` on the inner queries, from a copy
        of `index` and of the workspace's encoder (none with encoder=False). `order_seed` replaces
        cfg.seed once the trainer is built, when the seed no longer picks the hold-out split or
        the index, only batch orders, sampled documents and dropout."""
        import copy
        import dataclasses

        from jpq.train import JPQTrainer

        ws = self.ws
        t = (trainer_class or JPQTrainer)(
            cfg, ws.doc_emb, copy.deepcopy(index), self.inner, self.qrels, query_texts=ws.query_texts(),
            query_embeddings=self.query_rows, progress=False,
            encoder=copy.deepcopy(ws.encoder) if encoder else None, pseudo_queries=self.pseudo)
        if order_seed is not None:
            t.cfg = dataclasses.replace(cfg, seed=order_seed)
        return t

    def select_and_refit(self, cfg, index, seed: int, trainer_class=None) -> dict:
        """JPQ training as the demo does it, on the inner queries: a selection run of `cfg` (its
        val_fraction held out) chooses the epoch count, then two refits on all inner queries for
        that many epochs, one with `seed`'s batch order and one with seed + 1000's (batch order
        alone moves a 96x refit by about 0.01), each a `trainer_class` (default JPQTrainer). Returns
        {"epoch", "curve" (held-out scores),
        "selected", "refit", "refit'"}, each run's `outer_scores`; with epoch 0 chosen, the start is
        the model and both refits are it."""
        import dataclasses

        sel = self.trainer(cfg, index, trainer_class)
        sel.fit()  # loads the selected state
        best = sel.state.best_epoch
        runs = {"epoch": best, "curve": [round(h["val"], 4) for h in sel.state.history],
                "selected": self.outer_scores(sel)}
        for name, order in (("refit", None), ("refit'", seed + 1000)):
            if best == 0:
                runs[name] = runs["selected"]
                continue
            ref = self.trainer(dataclasses.replace(cfg, val_fraction=0.0, epochs=best), index, trainer_class,
                               order_seed=order)
            ref.fit()
            runs[name] = self.outer_scores(ref)
        return runs

    def outer_scores(self, trainer, metric: str = "ndcg@10") -> dict:
        """`metric` of the trainer's current state on the outer queries: {"all": mean over all of
        them, "unseen": mean over `outer_unseen`}, rounded to 4 digits."""
        import numpy as np

        per_query = trainer.evaluate_ids(self.outer, metrics=(metric,), per_query=True)[metric]
        return {"all": round(float(np.mean(list(per_query.values()))), 4),
                "unseen": round(float(np.mean([per_query[q] for q in self.outer_unseen])), 4)}
