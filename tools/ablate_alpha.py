"""Alpha ablation: train a grid of ``--alpha`` values, seeds and LCR forms, then tabulate and plot it.

    python -m tools.ablate_alpha --script cifar --alphas 0 1 4 8 16 --seeds 1 2 --forms paper official \\
        --out results/ablation_digits -- --dataset digits --epochs 15 -b 64 -j 0

Everything after ``--`` goes to the training script (``cifar/main.py`` or ``imagenet/main.py``)
unchanged, ``--fp_weights FILE`` for the official form included. The tool adds, per run::

    --alpha A --seed S --results_dir <out>/runs --save _<form>_a<A>_s<S> [--lcr_variant <form>]

``--alpha 0`` is plain IR-Net whatever the form, so it runs once per seed (``--save _irnet_a0_s<S>``)
and is the baseline shared by both forms.

State of a run folder ``<out>/runs/<model><save>/``, read before anything starts:

- finished: ``summary.csv`` has as many rows as ``args.json`` has ``epochs``: skipped;
- interrupted: ``checkpoint.pth.tar`` exists but the run is not finished (or its summary misses
  rows): rerun with ``--resume``, which also completes the records of a finished run;
- fresh: no ``checkpoint.pth.tar`` (whatever a run that died before its first epoch left): started
  from scratch;
- conflict: a finished or interrupted run whose ``args.json`` differs from the flags this grid would
  pass (flags that do not change the training, such as ``-j`` or ``--gpus``, are not compared): it is
  reported as failed and left alone, so one table never mixes two recipes.

Runs go ``--jobs`` at a time as subprocesses (``--devices 0 1 ...`` gives each running job its
own ``--gpus``); their stdout and stderr are appended to ``<out>/logs/<run>.out`` and ``.err``.
A failed run is reported with its exit status and last stderr line, the others go on, and the tool
exits with status 1 at the end. Ctrl-C or SIGTERM stops the running trainers before the tool exits.
The tool replaces its outputs in ``--out`` only when it made that folder (``--force`` overrides).
Outputs in ``--out``:

- ``ablation.csv``: one row per run of the grid: form, alpha, seed, status, best_top1, last_top1,
  best_top5, last_top5, lcr_share (``train_lcr_share``, the weighted LCR term over the total loss,
  as a fraction, averaged over all epochs of the run), epochs_done, epochs, run_folder (relative to
  ``--out``). Metrics are empty for runs without a summary.
- ``ablation.md``: per form and alpha, over the finished runs: best and last top-1 as mean ± sample
  standard deviation (n - 1) over seeds, LCR share in % (mean over seeds), number of seeds.
- ``ablation.png``: best (solid) and last (dashed) top-1 against alpha, one colour per form, with
  standard-deviation error bars, on a symlog alpha axis so that alpha 0 shows.
"""
if __package__ in (None, ""):  # run as a file: the imports below need the repository root on the path
    import sys
    sys.exit("run the tools from the repository root as modules: python -m tools.ablate_alpha "
             + " ".join(sys.argv[1:]))

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from utils import options
from utils import checkpoint as ckpt
from utils.checkpoint import NOT_RUN_DEFINING
from utils.outputs import IMAGE_TAG_KEY, has_tag, mark_folder
from utils.runfolder import atomic_text

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"cifar": (REPO_ROOT / "cifar" / "main.py", options.CIFAR_DEFAULTS),
           "imagenet": (REPO_ROOT / "imagenet" / "main.py", options.IMAGENET_DEFAULTS)}
FORMS = ("paper", "official")
BASELINE = "irnet"  # form label of the alpha-0 runs, shared by every form
# Flags the tool sets itself for every run; passing them after `--` is an error.
RESERVED = ("alpha", "seed", "results_dir", "save", "resume", "lcr_variant", "evaluate")
# Flags that do not change what a run trains (the training script's own list): a run folder that
# differs only in these is not a conflict.
NOT_COMPARED = set(NOT_RUN_DEFINING)
# Flags that only shape the regulariser, which an alpha-0 run does not build: the IR-Net baseline of a
# grid that changes one of them is still the same run.
REGULARISER_ONLY = {"lcr_variant", "lcr_iters", "lcr_surrogate", "lcr_sigma_f", "model_fp", "fp_weights",
                    "fp_pretrained"}
TAG = "lcr-bnn-ablation"
OUTPUTS = ("ablation.csv", "ablation.md", "ablation.png")
CHECKPOINTS = {"last": "checkpoint.pth.tar", "best": "model_best.pth.tar"}
CSV_FIELDS = ("form", "alpha", "seed", "status", "best_top1", "last_top1", "best_top5", "last_top5",
              "mca_last", "mca_best", "rel_mce_last", "rel_mce_best", "lipschitz_emp", "sigma_ratio",
              "lcr_share", "epochs_done", "epochs", "run_folder")
POLL_S = 0.2


@dataclasses.dataclass
class Run:
    """One point of the grid and the exact script flags that train it (without ``--resume``)."""

    form: str
    alpha: float
    seed: int
    folder: Path
    flags: list
    expected: dict  # the script's resolved arguments for these flags
    state: str = ""
    detail: str = ""

    @property
    def name(self):
        return self.folder.name


def alpha_text(alpha):
    """``8.0`` -> ``"8"``, ``0.5`` -> ``"0.5"``: how alpha appears in flags and folder names."""
    return f"{alpha:g}"


def grid(alphas, seeds, forms, official_alphas=None):
    """(form, alpha, seed) of every run: seeds outermost, so the first seed's sweep completes first.
    The official form runs only at ``official_alphas`` when given (and at every alpha > 0 when not)."""
    points = []
    for seed in seeds:
        for alpha in sorted(set(alphas) | set(official_alphas or ())):
            if alpha == 0:
                points.append((BASELINE, 0.0, seed))
                continue
            for form in forms:
                if form == "official" and official_alphas is not None:
                    wanted = alpha in official_alphas
                else:
                    wanted = alpha in alphas
                if wanted:
                    points.append((form, alpha, seed))
    return points


def script_parser(script):
    """The training script's own parser (so flags are checked exactly as the script checks them)."""
    _, defaults = SCRIPTS[script]
    parser = options.get_args_parser(defaults, f"{script}/main.py")
    parser.prog = f"{script}/main.py"
    return parser


def check_extra(script, extra, own_flags):
    """Exit with a message if the pass-through flags set what the tool sets (``own_flags``: dest names)."""
    parser = script_parser(script)
    unset = object()
    parser.set_defaults(**{dest: unset for dest in own_flags})
    parsed = parser.parse_args(extra)
    clash = [dest for dest in own_flags if getattr(parsed, dest) is not unset]
    if clash:
        names = ", ".join("--" + d for d in clash)
        sys.exit(f"error: {names} after '--' would clash with the flags the tool sets per run; "
                 f"use the tool's --alphas/--seeds/--forms/--out/--devices instead")


def build_runs(script, points, extra, runs_dir):
    """The :class:`Run` of every grid point, its flags validated by the script's parser."""
    runs = []
    for form, alpha, seed in points:
        save = f"_{form}_a{alpha_text(alpha)}_s{seed}"
        flags = list(extra) + ["--alpha", alpha_text(alpha), "--seed", str(seed),
                               "--results_dir", str(runs_dir), "--save", save]
        if form != BASELINE:
            flags += ["--lcr_variant", form]
        parser = script_parser(script)
        args = options.validate_args(parser, options.apply_defaults(parser.parse_args(flags), SCRIPTS[script][1]))
        expected = json.loads(json.dumps(vars(args)))  # the types args.json holds (lists, not tuples)
        runs.append(Run(form, alpha, seed, runs_dir / (args.model + save), flags, expected))
    return runs


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def read_rows(path):
    """Rows of a ``summary.csv`` as dicts of strings; [] if the file does not exist."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def folder_state(folder):
    """``(state, rows, epochs)`` of a run folder: state is finished, interrupted or fresh (module docstring).

    A folder that holds no checkpoint is fresh, whatever else is in it (the files of a run that died
    before its first epoch); a finished run whose summary misses rows is interrupted (its resume
    completes the records)."""
    args_path = folder / "args.json"
    args = read_json(args_path) if args_path.exists() else {}
    rows = read_rows(folder / "summary.csv")
    epochs = args.get("epochs")
    if not (folder / "checkpoint.pth.tar").exists():
        return "fresh", [], epochs
    if epochs and len(rows) >= epochs:
        return "finished", rows, epochs
    return "interrupted", rows, epochs


def differences(saved, expected, baseline=False):
    """``"name old -> new"`` for every compared argument where a run's args.json and the grid differ
    (for the alpha-0 ``baseline``, the regulariser's own flags are not compared)."""
    def value(key):
        return ckpt.saved_value(saved, key)
    skip = NOT_COMPARED | (REGULARISER_ONLY if baseline else set())
    return [f"--{key} {value(key)!r} -> {expected[key]!r}" for key in sorted(expected)
            if key not in skip and (key in saved or key in ckpt.LEGACY_VALUES) and value(key) != expected[key]]


def classify(run):
    """Set ``run.state`` and ``run.detail`` from its folder (finished / interrupted / fresh / conflict)."""
    state, rows, epochs = folder_state(run.folder)
    run.state, run.detail = state, f"{len(rows)}/{epochs} epochs done" if epochs else "new"
    if state in ("finished", "interrupted") and (run.folder / "args.json").exists():
        diff = differences(read_json(run.folder / "args.json"), run.expected, baseline=run.form == BASELINE)
        if diff:
            run.state = "conflict"
            run.detail = (f"{run.folder} was run with other flags ({'; '.join(diff)}); "
                          f"use another --out or delete that folder")
    return run


def command(script, run):
    """The argv that trains (or resumes) ``run``."""
    argv = [sys.executable, str(SCRIPTS[script][0]), *run.flags]
    return argv + ["--resume"] if run.state == "interrupted" else argv


def last_line(path, offset=0):
    """Last non-empty line of a text file from byte ``offset`` on ('' if none)."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        lines = [ln.strip() for ln in handle.read().decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def say(line):
    """Progress line, flushed at once so a sweep logged to a file shows where it is."""
    print(line, flush=True)


def execute(tasks, jobs, log_dir, env=None, devices=(), report=say, on_done=None):
    """Run ``tasks`` (``(name, argv)`` pairs), ``jobs`` at a time; returns ``{name: (exit status, seconds,
    last stderr line)}`` and calls ``on_done(name, status, seconds, line)`` as each one ends.

    Output is appended to ``<log_dir>/<name>.out`` and ``.err``. With ``devices``, each running task
    gets ``--gpus <device>`` of a free slot (slot ``i`` uses ``devices[i % len(devices)]``).
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, results = list(tasks), {}, {}
    free_slots = list(range(jobs))
    try:
        while pending or running:
            while pending and free_slots:
                name, argv = pending.pop(0)
                slot = free_slots.pop(0)
                if devices:
                    argv = [*argv, "--gpus", str(devices[slot % len(devices)])]
                out = open(log_dir / f"{name}.out", "a")
                err = open(log_dir / f"{name}.err", "a")
                offset = err.tell()
                proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
                running[proc] = (name, slot, out, err, offset, time.time())
                report(f"started  {name}" + (f" on GPU {devices[slot % len(devices)]}" if devices else ""))
            time.sleep(POLL_S)
            for proc in [p for p in running if p.poll() is not None]:
                name, slot, out, err, offset, start = running.pop(proc)
                out.close()
                err.close()
                free_slots.append(slot)
                results[name] = (proc.returncode, time.time() - start, last_line(log_dir / f"{name}.err", offset))
                if on_done:
                    on_done(name, *results[name])
    except BaseException:  # Ctrl-C, SIGTERM (see main) or a bug: no trainer may outlive the tool
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait()
        raise
    return results


def run_metrics(folder):
    """best/last top-1 and top-5, mean LCR share and epochs done of a run folder (None where unknown)."""
    rows = read_rows(folder / "summary.csv")
    if not rows:
        return {"best_top1": None, "last_top1": None, "best_top5": None, "last_top5": None,
                "lcr_share": None, "lipschitz_emp": None, "sigma_ratio": None, "epochs_done": 0}

    def column(key):
        return [float(r[key]) for r in rows if r.get(key, "") != ""]

    last = rows[-1]
    shares = column("train_lcr_share")
    return {"best_top1": float(last["best_top1"]) if last.get("best_top1") else max(column("val_top1")),
            "last_top1": float(last["val_top1"]),
            "best_top5": float(last["best_top5"]) if last.get("best_top5") else max(column("val_top5")),
            "last_top5": float(last["val_top5"]),
            "lcr_share": sum(shares) / len(shares) if shares else None,
            "lipschitz_emp": float(last["lipschitz_emp"]) if last.get("lipschitz_emp") else None,
            "sigma_ratio": float(last["sigma_ratio_mean"]) if last.get("sigma_ratio_mean") else None,
            "epochs_done": len(rows)}


def corruption_file(folder, kind):
    """Where the digits-C results of a run's ``kind`` ("last" or "best") checkpoint go."""
    stem = CHECKPOINTS[kind][:-len(".pth.tar")]
    return folder / f"{stem}_corruptions_digits.json"


def evaluate_digits_c(runs):
    """digits-C (tools.eval_corruptions) of the last and the best checkpoint of every finished run
    that has no results yet; quiet, one progress line per checkpoint."""
    from tools import eval_corruptions
    for run in runs:
        if folder_state(run.folder)[0] != "finished":
            continue
        for kind, name in CHECKPOINTS.items():
            out, checkpoint = corruption_file(run.folder, kind), run.folder / name
            if not checkpoint.exists() or (out.exists() and out.stat().st_mtime >= checkpoint.stat().st_mtime):
                continue
            started = time.time()
            args = eval_corruptions.get_args_parser().parse_args(
                ["--dataset", "digits", "--checkpoint", str(run.folder / name), "--gpus", "cpu", "--out", str(out)])
            with contextlib.redirect_stdout(io.StringIO()):
                results = eval_corruptions.run(args)
                eval_corruptions.write_outputs({k: v for k, v in results.items() if k != "out"}, str(out))
            say(f"digits-C {run.name} {kind}: mean corruption accuracy {results['mean_accuracy']:.2f} "
                f"({time.time() - started:.0f} s)")


def corruption_metrics(records, runs):
    """Mean corruption accuracy and relative mCE (against the IR-Net run of the same seed) of the last
    and best checkpoints, into ``records`` where digits-C results exist."""
    from tools.eval_corruptions import corruption_errors
    by_folder = {run.name: run for run in runs}
    results = {}
    for r in records:
        folder = by_folder[Path(r["run_folder"]).name].folder
        for kind in CHECKPOINTS:
            path = corruption_file(folder, kind)
            results[(r["form"], r["alpha"], r["seed"], kind)] = read_json(path) if path.exists() else None
    for r in records:
        for kind in CHECKPOINTS:
            ours = results[(r["form"], r["alpha"], r["seed"], kind)]
            base = results.get((BASELINE, 0.0, r["seed"], kind))
            r[f"mca_{kind}"] = ours["mean_accuracy"] if ours else None
            r[f"rel_mce_{kind}"] = (corruption_errors(ours, base)["relative_mce"] if ours and base else None)


def collect(runs, out):
    """One dict per run with the :data:`CSV_FIELDS`; status is finished, unfinished or missing."""
    records = []
    for run in runs:
        state, _, epochs = folder_state(run.folder)
        metrics = run_metrics(run.folder)
        status = "finished" if state == "finished" else ("unfinished" if metrics["epochs_done"] else "missing")
        records.append({"form": run.form, "alpha": run.alpha, "seed": run.seed, "status": status, **metrics,
                        **{f"{m}_{kind}": None for m in ("mca", "rel_mce") for kind in CHECKPOINTS},
                        "epochs": epochs if epochs else run.expected["epochs"],
                        "run_folder": os.path.relpath(run.folder, out)})
    return records


def write_csv(records, path):
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows({k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS} for r in records)
    atomic_text(path, table.getvalue())


def mean_std(values):
    """``(mean, sample std)``; std is None for fewer than two values."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(records):
    """``[(form, alpha, stats)]`` over finished runs, baseline first, then by form and alpha."""
    groups = {}
    for r in records:
        if r["status"] == "finished":
            groups.setdefault((r["form"], r["alpha"]), []).append(r)
    order = {BASELINE: -1, **{f: i for i, f in enumerate(FORMS)}}
    table = []
    for (form, alpha), rows in sorted(groups.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        shares = [r["lcr_share"] for r in rows if r["lcr_share"] is not None]
        stats = {"best": mean_std([r["best_top1"] for r in rows]),
                 "last": mean_std([r["last_top1"] for r in rows]),
                 "share": statistics.fmean(shares) if shares else None,
                 "seeds": sorted(r["seed"] for r in rows)}
        for key in ("mca_last", "mca_best", "rel_mce_last", "rel_mce_best", "lipschitz_emp", "sigma_ratio"):
            values = [r.get(key) for r in rows]
            stats[key] = mean_std(values) if values and None not in values else None
        table.append((form, alpha, stats))
    return table


def pm(stat, digits=2):
    """``"85.12 ± 0.30"``, ``"85.12"`` for a single seed, ``"–"`` when unknown."""
    if stat is None:
        return "–"
    mean, std = stat
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(records, table, title, setting):
    """The ``ablation.md`` text."""
    lines = [f"# {title}", "", setting, "",
             "Best top-1: highest validation top-1 of any epoch; last: the final epoch. Mean ± sample "
             "standard deviation (n - 1) over seeds; a single seed shows the value alone. LCR share: "
             "`train_lcr_share` (alpha-weighted LCR term / total training loss) averaged over all epochs "
             "of a run, then over seeds, in % (3 significant digits). Alpha 0 is plain IR-Net, one run "
             "per seed shared by both forms. With `--digits_c`: mCA is the mean digits-C accuracy over "
             "13 corruptions x 5 severities of the last and the best checkpoint, rel. mCE the relative "
             "mean corruption error against the IR-Net run of the same seed (100 = as robust as IR-Net; "
             "lower is more robust). L_emp: the last epoch's empirical Lipschitz estimate "
             "(`lipschitz_emp`), sigma_B/sigma_F the last epoch's mean over binary layers.",
             "", "| form | alpha | best top-1 (%) | last top-1 (%) | mCA last (%) | mCA best (%) | "
                 "rel. mCE last (%) | rel. mCE best (%) | L_emp | sigma_B/sigma_F | LCR share (%) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for form, alpha, s in table:
        label = "IR-Net (alpha 0, shared)" if form == BASELINE else form
        share = "–" if s["share"] is None else f"{100 * s['share']:.3g}"
        lines.append(f"| {label} | {alpha_text(alpha)} | {pm(s['best'])} | {pm(s['last'])} | {pm(s['mca_last'])} | "
                     f"{pm(s['mca_best'])} | {pm(s['rel_mce_last'], 1)} | {pm(s['rel_mce_best'], 1)} | "
                     f"{pm(s['lipschitz_emp'])} | {pm(s['sigma_ratio'], 3)} | {share} | "
                     f"{len(s['seeds'])} ({', '.join(map(str, s['seeds']))}) |")
    left_out = [r for r in records if r["status"] != "finished"]
    if left_out:
        lines += ["", "Left out (not finished): " + ", ".join(
            f"`{r['run_folder']}` ({r['epochs_done']}/{r['epochs']} epochs)" for r in left_out) + "."]
    return "\n".join(lines) + "\n"


def plot(table, path, title):
    """``ablation.png``: top-1 against alpha per form, the shared baseline at alpha 0 on every line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = [(alpha, s) for form, alpha, s in table if form == BASELINE]
    forms = [f for f in FORMS if any(form == f for form, _, _ in table)] or ([BASELINE] if baseline else [])
    robust = all(s["mca_last"] is not None for _, _, s in table)
    panels = (("best", "last", "validation top-1 (%)", "top-1"),) + (
        (("mca_best", "mca_last", "mean digits-C accuracy (%)", "mCA"),) if robust else ())
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
    alphas = sorted({alpha for _, alpha, _ in table})
    for ax, (best_key, last_key, ylabel, what) in zip(axes[0], panels):
        for i, form in enumerate(forms):
            points = baseline + [(alpha, s) for f, alpha, s in table if f == form and form != BASELINE]
            # dodge the forms sideways a little so that their error bars do not hide each other
            shift = 0.05 * (i - (len(forms) - 1) / 2)
            xs = [alpha * 10 ** shift if alpha > 0 else shift for alpha, _ in points]
            color = f"C{i}"
            for key, style, marker, label in ((best_key, "-", "o", "best"), (last_key, "--", "s", "last")):
                ys = [s[key][0] for _, s in points]
                errs = [s[key][1] or 0.0 for _, s in points]
                ax.errorbar(xs, ys, yerr=errs, linestyle=style, marker=marker, color=color, capsize=3,
                            markersize=5, markerfacecolor=color if key == best_key else "white",
                            label=f"{'IR-Net only' if form == BASELINE else form + ' form'}, {label} {what}")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xticks(alphas)
        ax.set_xticklabels([alpha_text(a) for a in alphas])
        ax.set_xlabel("alpha (symlog axis; 0 = IR-Net)")
        ax.set_ylabel(ylabel)
        ax.set_title(title if what == "top-1" else "robustness: digits-C", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={IMAGE_TAG_KEY: TAG})
    plt.close(fig)


def get_args_parser():
    p = argparse.ArgumentParser(
        prog="python -m tools.ablate_alpha",
        description="Train a grid of --alpha values, seeds and LCR forms, then write a table and a plot. "
                    "Flags after '--' go to the training script unchanged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--script", choices=sorted(SCRIPTS), default="cifar",
                   help="cifar: cifar/main.py, imagenet: imagenet/main.py")
    p.add_argument("--alphas", type=float, nargs="+", default=[0, 1, 4, 8, 16],
                   help="alpha values (0: plain IR-Net, run once per seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds, one run per alpha and seed")
    p.add_argument("--forms", nargs="+", choices=FORMS, default=["paper"],
                   help="LCR forms (--lcr_variant) for alpha > 0")
    p.add_argument("--official_alphas", type=float, nargs="+", default=None,
                   help="alpha values of the official form when --forms has it (default: --alphas)")
    p.add_argument("--out", required=True,
                   help="output folder: runs/ (run folders), logs/, ablation.csv, ablation.md, ablation.png")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (subprocesses)")
    p.add_argument("--devices", nargs="+", default=[],
                   help="GPU ids to spread parallel runs over (adds --gpus ID per run); default: the "
                        "script's --gpus for every run")
    p.add_argument("--dry_run", action="store_true", help="print each run's state and command, start nothing")
    p.add_argument("--table_only", action="store_true",
                   help="start nothing; write the csv, table and plot from the run folders as they are")
    p.add_argument("--force", action="store_true",
                   help="replace ablation.csv/.md/.png in an --out folder that this tool did not make")
    p.add_argument("--digits_c", action="store_true",
                   help="after training, evaluate the last and best checkpoint of every run on digits-C and add "
                        "mean corruption accuracy and relative mCE (against IR-Net, same seed) to the outputs")
    return p


def split_argv(argv):
    """``(tool flags, script flags)``, split at the first ``--``."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def train(todo, script, out, jobs, devices):
    """Start or resume ``todo``, ``jobs`` at a time; returns ``{run name: why it failed}``."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    by_name, failed = {r.name: r for r in todo}, {}

    def check(name, code, seconds, err_line):
        run = by_name[name]
        state, rows, epochs = folder_state(run.folder)
        if code != 0:
            failed[name] = f"exit status {code}: {err_line or '(no stderr)'}"
        elif state != "finished":
            failed[name] = f"exited 0 but summary.csv has {len(rows)} of {epochs or run.expected['epochs']} epochs"
        if name in failed:
            say(f"FAILED   {name}: {failed[name]} (full output: {out / 'logs' / name}.err)")
        else:
            m = run_metrics(run.folder)
            say(f"finished {name} in {seconds:.0f} s: best top-1 {m['best_top1']:.2f}, last {m['last_top1']:.2f}")

    execute([(r.name, command(script, r)) for r in todo], jobs, out / "logs", env, devices, on_done=check)
    return failed


def write_outputs(runs, out, script, extra, digits_c=False):
    """``ablation.csv``, ``ablation.md`` (also printed) and ``ablation.png`` from the run folders."""
    first = runs[0].expected
    records = collect(runs, out)
    if digits_c:
        corruption_metrics(records, runs)
    table = aggregate(records)
    setting = (f"`{script}/main.py`, dataset {first['dataset']}, model {first['model']}, "
               f"{first['epochs']} epochs, batch {first['batch_size']}, lr {first['lr']:g}; "
               f"flags passed through: `{shlex.join(extra) or '(none)'}`")
    title = f"Alpha ablation: {first['model']} on {first['dataset']}"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(records, out / "ablation.csv")
    md = markdown(records, table, title, setting)
    atomic_text(out / "ablation.md", md)
    say("\n" + md)
    if table:
        plot(table, out / "ablation.png", f"{title}, {first['epochs']} epochs")
        say(f"wrote {out / 'ablation.csv'}, {out / 'ablation.md'}, {out / 'ablation.png'}")
    else:
        (out / "ablation.png").unlink(missing_ok=True)
        say(f"wrote {out / 'ablation.csv'}, {out / 'ablation.md'}; no finished run to plot")


def main(argv=None):
    own, extra = split_argv(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    args = parser.parse_args(own)
    for flag, values in (("alphas", args.alphas), ("official_alphas", args.official_alphas or [])):
        bad = [a for a in values if not (math.isfinite(a) and a >= 0)]
        if bad:
            parser.error(f"--{flag} must be finite and >= 0, got {bad[0]:g}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    bad = [s for s in args.seeds if not 0 <= s <= options.MAX_SEED]
    if bad:
        parser.error(f"--seeds must be in 0..{options.MAX_SEED}, got {bad[0]}")
    forms, seeds = list(dict.fromkeys(args.forms)), list(dict.fromkeys(args.seeds))
    if args.official_alphas is not None and "official" not in forms:
        parser.error("--official_alphas needs --forms with official")
    out = Path(args.out).resolve()
    foreign = [name for name in OUTPUTS if (out / name).exists() and not has_tag(str(out), TAG)]
    if foreign and not args.force:
        parser.exit(1, f"error: {out} holds {', '.join(foreign)} that this tool did not write; pass another --out, "
                       f"or --force to replace them\n")
    check_extra(args.script, extra, RESERVED + (("gpus",) if args.devices else ()))
    points = grid(args.alphas, seeds, forms, args.official_alphas)
    runs = [classify(r) for r in build_runs(args.script, points, extra, out / "runs")]
    first = runs[0].expected
    if any(form == "official" for form, _, _ in points) and not (first["fp_weights"] or first["fp_pretrained"]):
        say("warning: the official form compares with a RANDOM full-precision network; "
            "pass --fp_weights FILE after '--' (see docs/REPRODUCE.md)")

    say(f"{len(runs)} runs in {out / 'runs'}:")
    for run in runs:
        say(f"  [{run.state}] {run.name}: {run.detail}")
        if args.dry_run and run.state in ("fresh", "interrupted"):
            say("    " + shlex.join(command(args.script, run)))
    if args.dry_run:
        return 0

    mark_folder(out, TAG)
    # SIGTERM (a job scheduler, kill) ends the tool like Ctrl-C: its trainers are stopped first
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    failed = {r.name: f"not started: {r.detail}" for r in runs if r.state == "conflict"}
    todo = [] if args.table_only else [r for r in runs if r.state in ("fresh", "interrupted")]
    if todo:
        failed.update(train(todo, args.script, out, args.jobs, args.devices))
    if args.digits_c:
        evaluate_digits_c(runs)
    write_outputs(runs, out, args.script, extra, args.digits_c)
    resumed = sum(r.state == "interrupted" for r in todo)
    say(f"runs: {sum(r.state == 'finished' for r in runs)} skipped (finished), {resumed} resumed, "
        f"{len(todo) - resumed} started, {len(failed)} failed")
    for name, why in failed.items():
        print(f"  failed: {name}: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
