"""Print our runs beside the published numbers of PAPER.md, as a Markdown table.

    python -m tools.paper_table --runs results/resnet20_1w1a_a8 results/resnet20_1w1a_a0
    python -m tools.paper_table --runs results --all      # every run folder under results/, every paper row

Each ``DIR`` is a run folder (``args.json`` + ``summary.csv``) or a folder searched recursively for
run folders. A run's paper row comes from ``dataset`` and ``model`` in its ``args.json``; runs with
``alpha`` 0 (plain IR-Net) go into our IR-Net columns, runs with ``alpha`` > 0 into our LCR-BNN
columns, one table line per (LCR form, alpha); runs set to different ``epochs`` are kept apart.
Several runs in one cell (seeds) show mean ± sample standard deviation and ``n``. Best: the highest
validation accuracy of any epoch (``best_top1``); last: the final epoch's. ImageNet cells are
``top-1 / top-5``, CIFAR cells top-1, all in %. A run whose ``summary.csv`` has fewer rows than
its ``epochs`` is marked unfinished; a folder without any completed epoch (a run that failed or was
killed before its first epoch ended) is skipped and counted.
"""
if __package__ in (None, ""):  # run as a file: the imports below need the repository root on the path
    import sys
    sys.exit("run the tools from the repository root as modules: python -m tools.paper_table " + " ".join(sys.argv[1:]))

import argparse
import csv
import json
import os
import statistics
import sys
from pathlib import Path

# Mirror of PAPER.md (dataset, model) -> published numbers, top-1 or (top-1, top-5), in %.
# None: "not published here" in PAPER.md; "-": PAPER.md has no entry for that method.
# recipe_epochs: the recipe behind the published IR-Net number (PAPER.md, "Recipes"); CIFAR ResNet-18
# has no recipe there, 400 is this code's CIFAR default.
PAPER_ROWS = [
    {"row": "CIFAR-10 ResNet-18", "dataset": "cifar10", "model": "resnet18_1w1a",
     "lcr": (91.8,), "irnet": (91.5,), "recipe_epochs": 400,
     "source": "IR-Net and RBNN READMEs; LCR via a reproduction report quoting the paper"},
    {"row": "CIFAR-10 ResNet-20 (Bi-Real blocks)", "dataset": "cifar10", "model": "resnet20_1w1a",
     "lcr": None, "irnet": (86.5,), "recipe_epochs": 400, "source": "IR-Net README; RBNN paper"},
    {"row": "CIFAR-10 VGG-Small", "dataset": "cifar10", "model": "vgg_small_1w1a",
     "lcr": None, "irnet": (90.4,), "recipe_epochs": 300, "source": "IR-Net README; RBNN paper"},
    {"row": "CIFAR-10 ResNet-20 W1A32", "dataset": "cifar10", "model": None,
     "lcr": "-", "irnet": (90.8,), "recipe_epochs": 400, "source": "IR-Net README",
     "note": "not implemented here: activations are always binarised (modules/binary.py)"},
    {"row": "ImageNet ResNet-18", "dataset": "imagenet", "model": "resnet18_1w1a_IR",
     "lcr": (59.6, 81.6), "irnet": (58.1, 80.0), "recipe_epochs": 100,
     "source": "READMEs; LCR via a reproduction report quoting the paper"},
    {"row": "ImageNet ResNet-34", "dataset": "imagenet", "model": "resnet34_1w1a_IR",
     "lcr": (63.5, None), "irnet": (62.9, 84.1), "recipe_epochs": 100,
     "source": "READMEs; LCR via a later paper's comparison table"},
]
NOT_PUBLISHED = "not published here"
COLUMNS = ("paper row", "published LCR-BNN", "ours LCR-BNN best", "ours LCR-BNN last", "published IR-Net",
           "ours IR-Net best", "ours IR-Net last", "epochs run / set (recipe)", "notes", "published source")


def find_run_folders(path):
    """Run folders (holding ``args.json``) at or under ``path``, sorted."""
    path = Path(path)
    if (path / "args.json").is_file():
        return [path]
    return sorted(Path(root) for root, dirs, files in os.walk(path) if "args.json" in files)


def read_run(folder):
    """What the table needs from one run folder: its arguments and best/last metrics."""
    with open(folder / "args.json") as handle:
        args = json.load(handle)
    summary = folder / "summary.csv"
    rows = []
    if summary.is_file():
        with open(summary, newline="") as handle:
            rows = list(csv.DictReader(handle))
    run = {"folder": folder, "dataset": args.get("dataset"), "model": args.get("model"),
           "alpha": float(args.get("alpha", 0.0)), "variant": args.get("lcr_variant", "paper"),
           "epochs": int(args.get("epochs", 0)), "done": len(rows)}
    if rows:
        last = rows[-1]
        best1 = max(float(r["val_top1"]) for r in rows)
        best5 = max(float(r["val_top5"]) for r in rows)
        run.update(best=(float(last.get("best_top1") or best1), float(last.get("best_top5") or best5)),
                   last=(float(last["val_top1"]), float(last["val_top5"])))
    return run


def paper_row(dataset, model):
    for row in PAPER_ROWS:
        if row["dataset"] == dataset and row["model"] == model:
            return row
    return None


def number(value):
    return "–" if value is None else f"{value:.1f}"


def published(values, top5):
    """A published cell: ``"91.8"``, ``"59.6 / 81.6"`` or ``not published here``."""
    if values is None:
        return NOT_PUBLISHED
    if isinstance(values, str):
        return values
    return " / ".join(number(v) for v in (values if top5 else values[:1]))


def stat(values):
    """``"91.23"`` or ``"91.23 ± 0.10"`` (sample std) for several runs."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def ours(runs, key, top5):
    """Our cell: best or last top-1 (and top-5) over the runs that have at least one epoch."""
    runs = [r for r in runs if r["done"]]
    if not runs:
        return "–"
    cell = " / ".join(stat([r[key][i] for r in runs]) for i in range(2 if top5 else 1))
    return cell + (f" (n={len(runs)})" if len(runs) > 1 else "")


def span(values):
    """``"400"`` or ``"37–400"`` for the smallest and largest of ``values``."""
    values = sorted(set(values))
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def epochs_cell(runs):
    """``"done/set"`` epochs of a cell's runs, e.g. ``"37–400/400"``."""
    return f"{span(r['done'] for r in runs)}/{span(r['epochs'] for r in runs)}"


def table_line(row, dataset, model, lcr, irnet):
    """One Markdown line: a paper row (or None), our LCR runs of one form and alpha, our alpha-0 runs."""
    top5 = dataset == "imagenet"
    recipe = row["recipe_epochs"] if row else None
    notes, epochs = [], []
    if lcr:
        notes.append(f"LCR: alpha {lcr[0]['alpha']:g}, {lcr[0]['variant']} form")
        epochs.append("LCR " + epochs_cell(lcr))
    if irnet:
        epochs.append("IR-Net " + epochs_cell(irnet))
    epochs_text = (", ".join(epochs) or "–") + (f" ({recipe})" if recipe else "")
    notes += [f"unfinished: {r['folder'].name} {r['done']}/{r['epochs']} epochs"
              for r in lcr + irnet if r["done"] < r["epochs"]]
    if recipe and any(r["epochs"] < recipe for r in lcr + irnet):
        notes.append(f"set to fewer epochs than the recipe's {recipe}")
    if "_fp" in str(model):
        notes.append("full-precision network")
    if row is None:
        notes.append("no published row in PAPER.md")
    elif row.get("note"):
        notes.append(row["note"])
    elif not lcr and not irnet:
        notes.append("not run")
    cells = [row["row"] if row else f"{dataset} {model}",
             published(row["lcr"], top5) if row else "–", ours(lcr, "best", top5), ours(lcr, "last", top5),
             published(row["irnet"], top5) if row else "–", ours(irnet, "best", top5), ours(irnet, "last", top5),
             epochs_text, "; ".join(notes) or "–", row["source"] if row else "–"]
    return "| " + " | ".join(cells) + " |"


def table_lines(runs, show_all=False):
    """The Markdown table (list of lines) for ``runs`` from :func:`read_run`.

    Paper rows first (in PAPER.md's order), then other (dataset, model) pairs. Within one pair, runs
    set to different epochs are never mixed: each epoch count pairs its LCR runs (a line per form
    and alpha) with its own alpha-0 runs.
    """
    groups = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["model"]), []).append(run)
    keys = [(r["dataset"], r["model"]) for r in PAPER_ROWS if show_all or (r["dataset"], r["model"]) in groups]
    keys += sorted((k for k in groups if paper_row(*k) is None), key=lambda k: (str(k[0]), str(k[1])))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for dataset, model in keys:
        row, group = paper_row(dataset, model), groups.get((dataset, model), [])
        if not group:
            lines.append(table_line(row, dataset, model, [], []))
        for epochs in sorted({r["epochs"] for r in group}, reverse=True):
            same = [r for r in group if r["epochs"] == epochs]
            irnet = [r for r in same if r["alpha"] == 0]
            lcr_keys = sorted({(r["variant"], r["alpha"]) for r in same if r["alpha"] > 0})
            for key in lcr_keys or [None]:
                lcr = [r for r in same if r["alpha"] > 0 and (r["variant"], r["alpha"]) == key]
                lines.append(table_line(row, dataset, model, lcr, irnet))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.paper_table", description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="DIR",
                   help="run folders, or folders searched recursively for run folders")
    p.add_argument("--all", action="store_true", help="also list the paper rows that have no run")
    args = p.parse_args(argv)
    folders = []
    for path in args.runs:
        if not Path(path).exists():
            p.error(f"{path} does not exist")
        folders += [f for f in find_run_folders(path) if f not in folders]
    if not folders:
        p.error(f"no run folder (one with args.json) in {' '.join(args.runs)}")
    runs = [read_run(f) for f in folders]
    started = [r for r in runs if r["done"]]
    if len(started) < len(runs):
        print(f"skipped {len(runs) - len(started)} run folder(s) without a completed epoch (a run that failed or "
              f"was stopped before its first epoch ended)")
    runs = started
    if not runs:
        p.error(f"no run folder with a completed epoch in {' '.join(args.runs)}")
    print("Top-1 in % (ImageNet: top-1 / top-5). Best: highest validation accuracy of any epoch; last: final "
          "epoch. Ours: alpha > 0 -> LCR-BNN, alpha 0 -> IR-Net; several runs: mean ± sample std.")
    print()
    print("\n".join(table_lines(runs, args.all)))
    print()
    print(f"{len(runs)} run folders read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
