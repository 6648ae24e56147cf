"""The query tower's learning rate: a nested hold-out on the train split.

    python bench/tower_rate_nested.py [--seeds 0,1,2] [--ratio 96] [--rates 1e-5,2e-5,4e-5]   # ~4 min per run
    python bench/tower_rate_nested.py --mode encoder    # the same for uncompressed-trained

`TrainConfig.lr_encoder` (2e-5) has been the same for every mode since the first demo and was never
chosen on held-out queries, while the centroid rate and the pseudo-query weight are. At 96x JPQ
full loses to uncompressed-trained on queries whose positives no training query points to; a tower
that moves less (or more) per step may keep more (or less) of the zero-shot ranking there. The runs
are those of `bench/field_nested.py --field lr_encoder` (its docstring says how each is trained
and scored; the test split is never read), cached in bench/results/tower_rate_nested.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from field_nested import main as field_main  # noqa: E402


def field_args(argv: list[str]) -> list[str]:
    """This script's arguments as bench/field_nested.py's: --rates is its --values (default 1e-5,2e-5,4e-5)."""
    out = ["--values" if a == "--rates" else a.replace("--rates=", "--values=", 1) for a in argv]
    return out if any(a == "--values" or a.startswith("--values=") for a in out) else out + ["--values", "1e-5,2e-5,4e-5"]


def main(argv=None):
    shown = list(sys.argv[1:] if argv is None else argv)
    field_main(field_args(shown), stem="tower_rate_nested", field="lr_encoder",
               title="The query tower's learning rate", script=__file__, shown_argv=shown)


if __name__ == "__main__":
    main()
