"""Per-epoch columns of groups of runs side by side, as a Markdown table (mean over each group's runs).

    python -m tools.epoch_curves --group before=/tmp/ab_ede/runs/*_a8_* --group after=/tmp/ab/runs/*_a8_* \\
        --columns train_grad_norm sigma_ratio_mean val_top1

Each ``--group LABEL=GLOB`` names run folders (``summary.csv`` inside; the glob is expanded by the
tool; quote it so that the shell leaves it alone). Each table line is one epoch; each cell the mean
of that column over the group's runs that reached that epoch, with the number of runs in the header. Any column of
``summary.csv`` can be shown (``python -m tools.epoch_curves --group x=RUN --columns`` with none
lists them). Used in docs/RESULTS.md to show what a change did to the gradient norms and the
sigma ratios over training.
"""
if __package__ in (None, ""):  # run as a file: the imports below need the repository root on the path
    import sys
    sys.exit("run the tools from the repository root as modules: python -m tools.epoch_curves "
             + " ".join(sys.argv[1:]))

import argparse
import csv
import glob
import math
import statistics
import sys
from pathlib import Path


def read_rows(folder):
    """The rows of ``folder/summary.csv`` as dicts of floats (empty cells: nan)."""
    with open(Path(folder) / "summary.csv", newline="") as handle:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                for row in csv.DictReader(handle)]


def group_runs(spec):
    """``"LABEL=GLOB"`` -> (label, run folders holding a summary.csv)."""
    label, sep, pattern = spec.partition("=")
    if not sep or not label or not pattern:
        raise ValueError(f"--group needs LABEL=GLOB, got {spec!r}")
    folders = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "summary.csv").is_file())
    if not folders:
        raise ValueError(f"--group {label}: no run folder with a summary.csv matches {pattern}")
    return label, folders


def curves(groups, columns):
    """``{(label, column): {epoch: mean over the group's runs}}`` and ``{label: run count}``."""
    table, counts = {}, {}
    for label, folders in groups:
        runs = [read_rows(f) for f in folders]
        counts[label] = len(runs)
        for column in columns:
            by_epoch = {}
            for rows in runs:
                for row in rows:
                    if column not in row:
                        raise ValueError(f"{column} is not a column of the runs of group {label}")
                    by_epoch.setdefault(int(row["epoch"]), []).append(row[column])
            table[(label, column)] = {e: statistics.fmean(v) for e, v in by_epoch.items()}
    return table, counts


def markdown(table, counts, columns):
    labels = list(counts)
    header = ["epoch"] + [f"{c} ({label}, n={counts[label]})" for c in columns for label in labels]
    epochs = sorted({e for cells in table.values() for e in cells})
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in epochs:
        cells = [table[(label, c)].get(e) for c in columns for label in labels]
        lines.append("| " + " | ".join([str(e)] + ["" if v is None else f"{v:.4g}" for v in cells]) + " |")
    return "\n".join(lines)


def get_args_parser():
    p = argparse.ArgumentParser(prog="python -m tools.epoch_curves", description=__doc__.split("\n\n")[0])
    p.add_argument("--group", action="append", required=True, metavar="LABEL=GLOB",
                   help="a label and a glob of run folders; give it once per group")
    p.add_argument("--columns", nargs="*", default=None, help="summary.csv columns to show")
    return p


def main(argv=None):
    p = get_args_parser()
    args = p.parse_args(argv)
    try:
        groups = [group_runs(spec) for spec in args.group]
        if not args.columns:
            with open(groups[0][1][0] / "summary.csv", newline="") as handle:
                print("columns: " + " ".join(next(csv.reader(handle), [])))
            return 0
        table, counts = curves(groups, args.columns)
    except (ValueError, OSError, csv.Error) as exc:
        p.exit(1, f"error: {exc}\n")
    print(markdown(table, counts, args.columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
