"""Accuracy and corruption error of a trained network on digits-C, CIFAR-10-C, CIFAR-100-C or ImageNet-C.

    python -m tools.eval_corruptions --dataset digits --checkpoint model_best.pth.tar
    python -m tools.eval_corruptions --dataset cifar10 --data_path CIFAR-10-C --checkpoint model_best.pth.tar
    python -m tools.eval_corruptions --dataset imagenet --data_path ImageNet-C --checkpoint best.pth.tar \\
        --baseline alexnet_imagenet_c.json --clean_error 60.2

Layouts (Hendrycks & Dietterich, ICLR 2019):

- digits-C: no files; the digits test split under this project's corruptions, generated
  deterministically in memory (``utils/corruptions.py``). The clean error is measured on the clean
  test split, so relative CE needs no ``--clean_error``.
- CIFAR-10-C / CIFAR-100-C: ``<data_path>/<corruption>.npy``, uint8 N x 32 x 32 x 3 with N = 5 x n,
  severity s in rows [(s-1) n, s n), and ``<data_path>/labels.npy`` with N labels (or n, shared by
  the five severities).
- ImageNet-C: ``<data_path>/<corruption>/<severity 1..5>/<class folder>/<image>``. The images are
  stored at 224 x 224 already, so they are read as Hendrycks' evaluation reads them: centre crop 224
  and normalise, with no resize (``utils.data.imagenet_c_transform``). The class index is the sorted
  class-folder order, as torchvision's ImageFolder.

A training checkpoint brings its model name and class count; a bare state dict needs ``--model``
(and ``--num_classes`` unless it is the dataset's). The table (accuracy in % per corruption and
severity, per-corruption means, overall mean, corruption errors) is printed and saved as JSON and
CSV. Corruption error, with E the top-1 error in %::

    CE_c          = 100 * sum_s E_{s,c}(f) / sum_s E_{s,c}(baseline)
    relative CE_c = 100 * sum_s (E_{s,c}(f) - E_clean(f)) / sum_s (E_{s,c}(baseline) - E_clean(baseline))
    mCE = mean_c CE_c, relative mCE = mean_c relative CE_c

The baseline is a JSON file written by this tool for another model (e.g. the ``--alpha 0`` IR-Net
run), or a hand-written one in its minimal form, e.g. AlexNet's published ImageNet-C errors::

    {"corruptions": {"gaussian_noise": {"error": [E_1, E_2, E_3, E_4, E_5]}, ...}, "clean_error": E}

JSON written (``format`` "lcr-bnn-corruptions", ``format_version`` 1; accuracies and errors in %,
lists indexed by severity 1..5); the tool never writes over a file it did not write (``--force``)::

    format, format_version, dataset, data_path, checkpoint, model, num_classes, severities
    corruptions     {name: {accuracy, error, correct, count (lists), mean_accuracy, mean_error}}
    mean_accuracy, mean_error      means over corruptions of the per-corruption means
    severity_mean_accuracy         list, mean over corruptions for each severity
    clean_error                    --clean_error or null
    baseline                       path of the baseline JSON or null
    ce, relative_ce                {name: %} or null
    mce, relative_mce              % or null

Any bad input ends the run with one ``error: ...`` line on stderr and exit status 1.
"""
if __package__ in (None, ""):  # run as a file: the imports below need the repository root on the path
    import sys
    sys.exit("run the tools from the repository root as modules: python -m tools.eval_corruptions "
             + " ".join(sys.argv[1:]))

import argparse
import csv
import io
import json
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import datasets as tv_datasets

import models
from utils.checkpoint import CheckpointError, read_model
from utils.data import (DataError, DigitsDataset, class_folders, collate_skipping_none, dataset_info,
                        imagenet_c_transform)
from utils.distributed import DeviceError, setup_runtime, wrap_model
from utils.engine import evaluate
from utils.outputs import IMAGE_TAG_KEY, OutputError, check_output, has_tag
from utils.runfolder import atomic_text

FORMAT_VERSION = 1
TAG = "lcr-bnn-corruptions"
DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
SEVERITIES = (1, 2, 3, 4, 5)
LABELS_FILE = "labels.npy"
CIFAR_C_IMAGE_SHAPE = (32, 32, 3)  # height, width, channels of one stored image
PIXEL_MAX = 255.0  # uint8 images are scaled to [0, 1] like transforms.ToTensor


class CorruptionError(Exception):
    """Bad corruption data, baseline or arguments; the message is one line saying what to do."""


# --- model -----------------------------------------------------------------------------------------


def load_model(path, model_name=None, num_classes=None, default_classes=None):
    """Build the network stored at ``path`` and load its weights; return ``(model, meta)``.

    A training checkpoint gives the model name, class count and dataset; a bare state dict needs
    ``model_name`` (its classes are read off its classifier, else ``num_classes`` or
    ``default_classes``). ``meta`` holds ``model``, ``num_classes`` and ``dataset`` (None when unknown).
    """
    try:
        return read_model(path, model_name, num_classes or None)
    except CheckpointError:
        if num_classes or not default_classes:
            raise
        return read_model(path, model_name, default_classes)


# --- data ------------------------------------------------------------------------------------------


def list_corruptions(root, dataset):
    """Names of the corruptions stored under ``root`` (``*.npy`` files or folders), sorted; for
    digits-C the generated families."""
    if dataset == "digits":
        from utils.corruptions import FAMILIES
        return list(FAMILIES)
    if not os.path.isdir(root):
        raise CorruptionError(f"corruption folder {root} does not exist or is not a folder; "
                              f"pass --data_path pointing at {_layout(dataset)}")
    with os.scandir(root) as entries:
        if dataset == "imagenet":
            names = [e.name for e in entries if e.is_dir()]
        else:
            names = [e.name[:-len(".npy")] for e in entries
                     if e.is_file() and e.name.endswith(".npy") and e.name != LABELS_FILE]
    if not names:
        raise CorruptionError(f"corruption folder {root} holds no corruptions; expected {_layout(dataset)}")
    return sorted(names)


def _layout(dataset):
    if dataset == "imagenet":
        return "<data_path>/<corruption>/<1..5>/<class>/<image>"
    return "<data_path>/<corruption>.npy and <data_path>/labels.npy"


def select_corruptions(root, dataset, wanted):
    """``wanted`` (a list, or None for all) checked against what ``root`` holds."""
    present = list_corruptions(root, dataset)
    if not wanted:
        return present
    missing = [c for c in wanted if c not in present]
    if missing:
        raise CorruptionError(f"corruption(s) {', '.join(missing)} not found in {root}; "
                              f"present: {', '.join(present)}")
    return list(dict.fromkeys(wanted))


def _load_npy(path, what):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CorruptionError(f"{what} {path} is not a readable .npy file ({type(exc).__name__}); "
                              f"replace it with the original download") from None


def read_cifar_c(root, corruptions, num_classes):
    """Memory-map and check the CIFAR-C arrays; return ``({name: images N x 32 x 32 x 3}, labels)``.

    ``labels`` is an int64 array; it has either N entries or N / 5 shared by every severity.
    """
    labels_path = os.path.join(root, LABELS_FILE)
    if not os.path.isfile(labels_path):
        raise CorruptionError(f"{labels_path} is missing; CIFAR-C folders hold {LABELS_FILE} "
                              f"next to the <corruption>.npy files")
    labels = np.asarray(_load_npy(labels_path, "label file"))
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptionError(f"{labels_path} holds {labels.dtype} of shape {labels.shape}; "
                              f"expected one integer label per image")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptionError(f"{labels_path} has labels {labels.min()}..{labels.max()} but the model has "
                              f"{num_classes} classes; pick the --dataset and checkpoint that match")
    images = {}
    for name in corruptions:
        path = os.path.join(root, f"{name}.npy")
        array = _load_npy(path, "corruption file")
        if array.dtype != np.uint8 or array.ndim != 4 or tuple(array.shape[1:]) != CIFAR_C_IMAGE_SHAPE:
            raise CorruptionError(f"{path} holds {array.dtype} of shape {tuple(array.shape)}; expected "
                                  f"uint8 N x {' x '.join(map(str, CIFAR_C_IMAGE_SHAPE))}")
        n_images = array.shape[0]
        if n_images == 0 or n_images % len(SEVERITIES):
            raise CorruptionError(f"{path} has {n_images} images, not a positive multiple of "
                                  f"{len(SEVERITIES)} (one block per severity)")
        if len(labels) not in (n_images, n_images // len(SEVERITIES)):
            raise CorruptionError(f"{labels_path} has {len(labels)} labels but {path} has {n_images} images; "
                                  f"expected {n_images} or {n_images // len(SEVERITIES)} labels")
        images[name] = array
    return images, labels


def cifar_c_loader(images, labels, severity, mean, std, batch_size):
    """Yield normalised ``(images B x 3 x 32 x 32, labels)`` batches of one severity (1..5)."""
    per_severity = images.shape[0] // len(SEVERITIES)
    start = (severity - 1) * per_severity
    shared = len(labels) == per_severity
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    for lo in range(0, per_severity, batch_size):
        hi = min(lo + batch_size, per_severity)
        batch = torch.from_numpy(np.array(images[start + lo:start + hi]))  # a writable copy of the mapped rows
        # Same operations in the same order as ToTensor followed by Normalize.
        batch = batch.permute(0, 3, 1, 2).float().div(PIXEL_MAX).sub(mean).div(std)
        rows = labels[lo:hi] if shared else labels[start + lo:start + hi]
        yield batch, torch.from_numpy(np.array(rows))


def digits_c_loader(family, severity, batch_size):
    """Batches of the digits test split under ``family`` at ``severity`` (1..5), normalised."""
    from utils.corruptions import digits_c
    images, labels = digits_c(family, severity)
    for lo in range(0, len(labels), batch_size):
        yield images[lo:lo + batch_size], labels[lo:lo + batch_size]


def check_imagenet_c(root, corruptions, num_classes):
    """Check that every corruption has severity folders 1..5 with the same class folders."""
    reference = None
    for name in corruptions:
        for severity in SEVERITIES:
            folder = os.path.join(root, name, str(severity))
            if not os.path.isdir(folder):
                raise CorruptionError(f"severity folder {folder} is missing; expected "
                                      f"{_layout('imagenet')}")
            classes = class_folders(folder)
            if reference is None:
                reference = (folder, classes)
            elif classes != reference[1]:
                raise CorruptionError(f"class folders of {folder} differ from those of {reference[0]}; "
                                      f"every severity needs the same classes")
    if len(reference[1]) != num_classes:
        raise CorruptionError(f"{reference[0]} has {len(reference[1])} class folders but the model has "
                              f"{num_classes} classes; pick the checkpoint that matches")


def imagenet_c_sets(root, corruption, transform):
    """One ImageFolder per severity (1..5) of ``corruption``."""
    sets = []
    for severity in SEVERITIES:
        folder = os.path.join(root, corruption, str(severity))
        try:
            sets.append(tv_datasets.ImageFolder(folder, transform=transform))
        except (FileNotFoundError, OSError) as exc:
            raise CorruptionError(f"cannot read {folder}: {exc}") from None
    return sets


# --- corruption error ----------------------------------------------------------------------------


def baseline_errors(baseline, names):
    """``{name: [E_1..E_5]}`` (%) of ``baseline`` for every corruption in ``names``, checked."""
    table = baseline.get("corruptions")
    if not isinstance(table, dict):
        raise CorruptionError("baseline has no 'corruptions' table; write it with this tool or as "
                              "{\"corruptions\": {name: {\"error\": [5 values in %]}}}")
    missing = [c for c in names if c not in table]
    if missing:
        raise CorruptionError(f"baseline has no errors for {', '.join(missing)}; add them to it or "
                              f"pass --corruptions {','.join(c for c in names if c in table) or 'NAMES'}")
    errors = {}
    for name in names:
        values = table[name].get("error") if isinstance(table[name], dict) else None
        if not isinstance(values, list) or len(values) != len(SEVERITIES):
            raise CorruptionError(f"baseline errors of {name} must be a list of {len(SEVERITIES)} values "
                                  f"in %, one per severity")
        errors[name] = [float(e) for e in values]
        if sum(errors[name]) <= 0:
            raise CorruptionError(f"baseline errors of {name} sum to {sum(errors[name])}; CE is undefined")
    return errors


def corruption_errors(results, baseline, clean_error=None):
    """CE and relative CE (%) per corruption of ``results`` against ``baseline``; their means.

    Both arguments are dicts in this tool's JSON schema (only ``corruptions.<name>.error`` and
    ``clean_error`` are read). Relative values need the clean error of both, else they are None.
    Returns ``{"ce", "mce", "relative_ce", "relative_mce"}``.
    """
    theirs = baseline_errors(baseline, list(results["corruptions"]))
    clean_f = results.get("clean_error") if clean_error is None else clean_error
    clean_b = baseline.get("clean_error")
    relative = clean_f is not None and clean_b is not None
    ce, relative_ce = {}, {}
    for name, base in theirs.items():
        ours = [float(e) for e in results["corruptions"][name]["error"]]
        ce[name] = 100.0 * sum(ours) / sum(base)
        if relative:
            denominator = sum(e - float(clean_b) for e in base)
            if denominator == 0:
                raise CorruptionError(f"baseline errors of {name} equal its clean error; "
                                      f"relative CE is undefined")
            relative_ce[name] = 100.0 * sum(e - float(clean_f) for e in ours) / denominator
    return {"ce": ce, "mce": sum(ce.values()) / len(ce),
            "relative_ce": relative_ce if relative else None,
            "relative_mce": sum(relative_ce.values()) / len(relative_ce) if relative else None}


def read_baseline(path):
    """The baseline JSON as a dict."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except OSError as exc:
        raise CorruptionError(f"cannot read baseline {path} ({exc.strerror}); pass a JSON written by "
                              f"this tool") from None
    except json.JSONDecodeError as exc:
        raise CorruptionError(f"baseline {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise CorruptionError(f"baseline {path} holds a JSON {type(data).__name__}, not an object")
    return data


def summarise(per_corruption):
    """Means over severities and corruptions of ``{name: {"correct": [...], "count": [...]}}``."""
    table = {}
    for name, row in per_corruption.items():
        accuracy = [100.0 * c / n for c, n in zip(row["correct"], row["count"])]
        table[name] = {"accuracy": accuracy, "error": [100.0 - a for a in accuracy],
                       "correct": row["correct"], "count": row["count"],
                       "mean_accuracy": sum(accuracy) / len(accuracy),
                       "mean_error": 100.0 - sum(accuracy) / len(accuracy)}
    mean_accuracy = sum(r["mean_accuracy"] for r in table.values()) / len(table)
    severity_mean = [sum(r["accuracy"][i] for r in table.values()) / len(table)
                     for i in range(len(SEVERITIES))]
    return table, mean_accuracy, severity_mean


# --- output ----------------------------------------------------------------------------------------


def _fmt(value):
    return "" if value is None else f"{value:.2f}"


def _fmt4(value):
    return "" if value is None else f"{value:.4f}"


def format_table(results):
    """The printed table: accuracy (%) per severity, mean, CE and relative CE per corruption."""
    ce = results["ce"] or {}
    rel = results["relative_ce"] or {}
    width = max(len("corruption"), *(len(n) for n in results["corruptions"]))
    head = "".join(f"{f's{s}':>8}" for s in SEVERITIES) + f"{'mean':>8}{'CE':>8}{'rel CE':>8}"
    lines = [f"{'corruption':<{width}}{head}"]
    for name, row in results["corruptions"].items():
        cells = "".join(f"{a:>8.2f}" for a in row["accuracy"])
        lines.append(f"{name:<{width}}{cells}{row['mean_accuracy']:>8.2f}"
                     f"{_fmt(ce.get(name)):>8}{_fmt(rel.get(name)):>8}")
    cells = "".join(f"{a:>8.2f}" for a in results["severity_mean_accuracy"])
    lines.append(f"{'mean':<{width}}{cells}{results['mean_accuracy']:>8.2f}"
                 f"{_fmt(results['mce']):>8}{_fmt(results['relative_mce']):>8}")
    summary = f"mean accuracy {results['mean_accuracy']:.2f}%"
    if results["mce"] is not None:
        summary += f", mCE {results['mce']:.2f}%"
    if results["relative_mce"] is not None:
        summary += f", relative mCE {results['relative_mce']:.2f}%"
    lines.append(summary + ("" if results["baseline"] is None else f" (baseline {results['baseline']})"))
    return "\n".join(lines)


def write_outputs(results, json_path):
    """Write the results as JSON at ``json_path`` and as CSV next to it; return the CSV path."""
    csv_path = os.path.splitext(json_path)[0] + ".csv"
    folder = os.path.dirname(os.path.abspath(json_path))
    os.makedirs(folder, exist_ok=True)
    ce = results["ce"] or {}
    rel = results["relative_ce"] or {}
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["corruption", *(f"acc_s{s}" for s in SEVERITIES), "mean_accuracy", "ce", "relative_ce"])
    for name, row in results["corruptions"].items():
        writer.writerow([name, *(f"{a:.4f}" for a in row["accuracy"]), f"{row['mean_accuracy']:.4f}",
                         _fmt4(ce.get(name)), _fmt4(rel.get(name))])
    writer.writerow(["mean", *(f"{a:.4f}" for a in results["severity_mean_accuracy"]),
                     f"{results['mean_accuracy']:.4f}", _fmt4(results["mce"]), _fmt4(results["relative_mce"])])
    atomic_text(csv_path, table.getvalue())   # the CSV first: a JSON beside it says both are complete
    atomic_text(json_path, json.dumps(results, indent=2) + "\n")
    return csv_path


# --- command line ----------------------------------------------------------------------------------


def get_args_parser():
    parser = argparse.ArgumentParser(description="Accuracy and mCE on CIFAR-10-C, CIFAR-100-C or ImageNet-C")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=DATASETS,
                   help="which benchmark; picks the layout and normalisation (default: the checkpoint's "
                        "training dataset)")
    g.add_argument("--data_path", default=None,
                   help="CIFAR-C folder of <corruption>.npy + labels.npy, or ImageNet-C root (digits-C needs none)")
    g.add_argument("--corruptions", nargs="+", default=None, metavar="NAME",
                   help="corruptions to evaluate, space- or comma-separated (default: all in --data_path)")
    g.add_argument("--image_size", type=int, default=None,
                   help=f"ImageNet-C centre crop in pixels (default: {dataset_info('imagenet')['image_size']})")
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", "-e", "--evaluate", dest="checkpoint", required=True, metavar="FILE",
                   help="training checkpoint or bare state dict")
    g.add_argument("-a", "--model", default=None, choices=models.list_models(), metavar="NAME",
                   help=f"model name, one of {', '.join(models.list_models())}; needed for a bare state dict "
                        f"(default: the checkpoint's)")
    g.add_argument("--num_classes", type=int, default=None,
                   help="classifier width of a bare state dict (default: the checkpoint's, else the dataset's)")
    g = parser.add_argument_group("run")
    g.add_argument("-b", "--batch_size", type=int, default=256, help="images per batch (default: 256)")
    g.add_argument("-j", "--workers", type=int, default=4,
                   help="ImageNet-C data-loading processes (default: 4)")
    g.add_argument("--gpus", default="0",
                   help="GPU ids such as 0 or 0,1 (DataParallel), or cpu; CPU when there is no GPU (default: 0)")
    g = parser.add_argument_group("corruption error")
    g.add_argument("--baseline", default=None, metavar="FILE.json",
                   help="results JSON of the reference model for CE/mCE (default: none, accuracy only)")
    g.add_argument("--clean_error", type=float, default=None, metavar="PCT",
                   help="top-1 error (%%) of this model on the clean validation set, for relative mCE "
                        "(default: none)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="FILE.json",
                   help="results JSON; the CSV gets the same stem (default: "
                        "<checkpoint stem>_corruptions_<dataset>.json next to the checkpoint)")
    g.add_argument("--force", action="store_true", help="replace output files that this tool did not write")
    g.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw accuracy against severity, one line per corruption (clean at severity 0)")
    return parser


def severity_loaders(args, dataset, root, corruptions, num_classes, device):
    """Check the data now; return ``loaders(name)`` giving five batch iterables, severity 1..5."""
    info = dataset_info(dataset)
    if dataset == "digits":
        return lambda name: [digits_c_loader(name, s, args.batch_size) for s in SEVERITIES]
    if dataset == "imagenet":
        check_imagenet_c(root, corruptions, num_classes)
        transform = imagenet_c_transform(args.image_size or info["image_size"])
        return lambda name: [DataLoader(s, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                                        pin_memory=device.type == "cuda", collate_fn=collate_skipping_none)
                             for s in imagenet_c_sets(root, name, transform)]
    images, labels = read_cifar_c(root, corruptions, num_classes)
    return lambda name: [cifar_c_loader(images[name], labels, s, info["mean"], info["std"], args.batch_size)
                         for s in SEVERITIES]


def clean_digits_error(net, device, batch_size):
    """Top-1 error (%) on the clean digits test split, the reference point of relative CE."""
    test = DigitsDataset(train=False)
    batches = ((test.images[i:i + batch_size].repeat(1, 3, 1, 1), test.labels[i:i + batch_size])
               for i in range(0, len(test), batch_size))
    return 100.0 - evaluate(net, batches, device)["top1"]


def output_path(args, dataset):
    """``--out``, or ``<checkpoint stem>_corruptions_<dataset>.json`` beside the checkpoint."""
    if args.out:
        return args.out
    stem = args.checkpoint
    for suffix in (".tar", ".pth", ".pt"):
        stem = stem[:-len(suffix)] if stem.endswith(suffix) else stem
    return f"{stem}_corruptions_{dataset}.json"


def run(args):
    """Evaluate every selected corruption and severity; return the results dict (see module doc)."""
    if args.batch_size < 1:
        raise CorruptionError(f"--batch_size must be at least 1, got {args.batch_size}")
    default_classes = dataset_info(args.dataset)["num_classes"] if args.dataset else None
    model, meta = load_model(args.checkpoint, args.model, args.num_classes, default_classes)
    dataset = args.dataset or meta["dataset"]
    if dataset not in DATASETS:
        raise CorruptionError(f"cannot tell which benchmark fits {args.checkpoint}; pass --dataset "
                              f"{'|'.join(DATASETS)}")
    if dataset != "digits" and not args.data_path:
        raise CorruptionError(f"--dataset {dataset} needs --data_path pointing at {_layout(dataset)}")
    root = os.path.abspath(os.path.expanduser(args.data_path)) if args.data_path else None
    out = output_path(args, dataset)
    check_output(out, TAG, inputs=[args.checkpoint, args.baseline], force=args.force)
    table = os.path.splitext(out)[0] + ".csv"     # ours when the JSON beside it is ours
    if os.path.exists(table) and not args.force and not has_tag(out, TAG):
        raise OutputError(f"{table} exists and was not written by this tool; pass another --out, or --force "
                          f"to replace it")
    wanted = [c for item in args.corruptions for c in item.split(",") if c] if args.corruptions else None
    corruptions = select_corruptions(root, dataset, wanted)
    runtime = setup_runtime(args.gpus, allow_distributed=False)
    loaders = severity_loaders(args, dataset, root, corruptions, meta["num_classes"], runtime.device)
    baseline = read_baseline(args.baseline) if args.baseline else None
    if baseline is not None:
        baseline_errors(baseline, corruptions)  # fail now, not after the whole evaluation
    if runtime.notice:
        print(runtime.notice)
    net = wrap_model(model.to(runtime.device), runtime)
    clean_error = args.clean_error
    if dataset == "digits" and clean_error is None:
        clean_error = clean_digits_error(net, runtime.device, args.batch_size)

    per_corruption = {}
    for name in corruptions:
        started = time.time()
        try:
            scores = [evaluate(net, loader, runtime.device) for loader in loaders(name)]
        except OSError as exc:  # an unreadable image file of ImageNet-C
            raise CorruptionError(f"cannot read an image of corruption {name}: {exc}") from None
        per_corruption[name] = {"correct": [s["correct"] for s in scores], "count": [s["count"] for s in scores]}
        print(f"{name}: {sum(per_corruption[name]['count'])} images in {time.time() - started:.1f} s", flush=True)

    table, mean_accuracy, severity_mean = summarise(per_corruption)
    results = {
        "format": TAG, "format_version": FORMAT_VERSION, "dataset": dataset, "data_path": root,
        "checkpoint": os.path.abspath(args.checkpoint), "model": meta["model"],
        "num_classes": meta["num_classes"], "severities": list(SEVERITIES), "corruptions": table,
        "mean_accuracy": mean_accuracy, "mean_error": 100.0 - mean_accuracy,
        "severity_mean_accuracy": severity_mean, "clean_error": clean_error,
        "baseline": os.path.abspath(args.baseline) if args.baseline else None,
        "ce": None, "mce": None, "relative_ce": None, "relative_mce": None, "out": out,
    }
    if baseline is not None:
        results.update(corruption_errors(results, baseline))
        if clean_error is not None and results["relative_mce"] is None:
            print(f"baseline {args.baseline} has no clean_error: relative mCE not computed")
    return results


def plot_curves(results, path, force=False):
    """Accuracy (%) against severity, one line per corruption; severity 0 is the clean accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    check_output(path, TAG, force=force, flag="--plot")
    clean = None if results["clean_error"] is None else 100.0 - results["clean_error"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, row) in enumerate(results["corruptions"].items()):
        xs = ([0] if clean is not None else []) + list(results["severities"])
        ys = ([clean] if clean is not None else []) + list(row["accuracy"])
        ax.plot(xs, ys, marker="o", markersize=3, color=plt.cm.tab20(i % 20), label=name)
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{results['model']} on {results['dataset']}-C: {os.path.basename(results['checkpoint'])}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={IMAGE_TAG_KEY: TAG})
    plt.close(fig)


def main(argv=None):
    """Command-line entry point; returns the results dict, or exits with status 1 on bad input."""
    args = get_args_parser().parse_args(argv)
    try:
        results = run(args)
        out = results.pop("out")
        try:
            csv_path = write_outputs(results, out)
            if args.plot:
                plot_curves(results, args.plot, args.force)
        except OSError as exc:
            raise CorruptionError(f"cannot write {out} ({exc.strerror}); pass --out FILE.json") from None
    except (CorruptionError, CheckpointError, DataError, DeviceError, OutputError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        raise SystemExit(1) from None
    print(format_table(results))
    print(f"saved {out} and {csv_path}")
    return results


if __name__ == "__main__":
    main()
