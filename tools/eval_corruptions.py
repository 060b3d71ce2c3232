"""Accuracy and corruption error of a trained network on CIFAR-10-C, CIFAR-100-C or ImageNet-C.

    python -m tools.eval_corruptions --dataset cifar10 --data_path CIFAR-10-C --checkpoint model_best.pth.tar
    python -m tools.eval_corruptions --dataset imagenet --data_path ImageNet-C --checkpoint best.pth.tar \\
        --baseline alexnet_imagenet_c.json --clean_error 60.2

Layouts (Hendrycks & Dietterich, ICLR 2019):

- CIFAR-10-C / CIFAR-100-C: ``<data_path>/<corruption>.npy``, uint8 N x 32 x 32 x 3 with N = 5 x n,
  severity s in rows [(s-1) n, s n), and ``<data_path>/labels.npy`` with N labels (or n, shared by
  the five severities).
- ImageNet-C: ``<data_path>/<corruption>/<severity 1..5>/<class folder>/<image>``, read with the
  ImageNet validation transform (resize 256, centre crop 224, normalise); the class index is the
  sorted class-folder order, as torchvision's ImageFolder.

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

JSON written (``format_version`` 1; accuracies and errors in %, lists indexed by severity 1..5)::

    format_version, dataset, data_path, checkpoint, model, num_classes, severities
    corruptions     {name: {accuracy, error, correct, count (lists), mean_accuracy, mean_error}}
    mean_accuracy, mean_error      means over corruptions of the per-corruption means
    severity_mean_accuracy         list, mean over corruptions for each severity
    clean_error                    --clean_error or null
    baseline                       path of the baseline JSON or null
    ce, relative_ce                {name: %} or null
    mce, relative_mce              % or null

Any bad input ends the run with one ``error: ...`` line on stderr and exit status 1.
"""
import argparse
import csv
import json
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import datasets as tv_datasets
from torchvision import transforms

import models
from utils.checkpoint import CheckpointError, is_training_checkpoint, load_file, load_model_weights
from utils.data import IMAGENET_RESIZE_PX, DataError, dataset_info
from utils.distributed import DeviceError, parse_gpus

FORMAT_VERSION = 1
DATASETS = ("cifar10", "cifar100", "imagenet")
SEVERITIES = (1, 2, 3, 4, 5)
LABELS_FILE = "labels.npy"
CIFAR_C_IMAGE_SHAPE = (32, 32, 3)  # height, width, channels of one stored image
PIXEL_MAX = 255.0  # uint8 images are scaled to [0, 1] like transforms.ToTensor


class CorruptionError(Exception):
    """Bad corruption data, baseline or arguments; the message is one line saying what to do."""


# --- model -----------------------------------------------------------------------------------------


def load_model(path, model_name=None, num_classes=None, default_classes=None):
    """Build the network stored at ``path`` and load its weights; return ``(model, meta)``.

    A training checkpoint gives the model name and class count (``model_name``/``num_classes``,
    when given, must agree); a bare state dict needs ``model_name`` and ``num_classes`` or
    ``default_classes``. ``meta`` holds ``model``, ``num_classes`` and ``dataset`` (from the
    checkpoint's saved arguments, else None).
    """
    obj = load_file(path)
    dataset = None
    if is_training_checkpoint(obj):
        model_name = model_name or obj.get("model")
        num_classes = num_classes or obj.get("num_classes")
        saved_args = obj.get("args") or {}
        dataset = saved_args.get("dataset") if isinstance(saved_args, dict) else None
    else:
        num_classes = num_classes or default_classes
        if not model_name or not num_classes:
            raise CorruptionError(f"checkpoint {path} is a bare state dict; pass --model NAME and "
                                  f"--num_classes N (or --dataset)")
    try:
        model = models.create_model(model_name, num_classes=int(num_classes))
    except ValueError as exc:
        raise CorruptionError(str(exc)) from None
    load_model_weights(model, obj, path, model_name, int(num_classes))
    model.eval()
    return model, {"model": model_name, "num_classes": int(num_classes), "dataset": dataset}


def pick_device(gpus_flag):
    """First GPU named by ``--gpus`` when CUDA is there, else the CPU; also a notice line or ''."""
    gpus = parse_gpus(gpus_flag)
    if not gpus:
        return torch.device("cpu"), [], ""
    if not torch.cuda.is_available():
        return torch.device("cpu"), [], f"no GPU found: running on CPU (ignoring --gpus {gpus_flag})"
    count = torch.cuda.device_count()
    bad = [g for g in gpus if not 0 <= g < count]
    if bad:
        raise DeviceError(f"--gpus names GPU {bad[0]} but this machine has {count} "
                          f"(ids 0..{count - 1}); pass e.g. --gpus 0")
    return torch.device("cuda", gpus[0]), gpus, ""


# --- data ------------------------------------------------------------------------------------------


def list_corruptions(root, dataset):
    """Names of the corruptions stored under ``root`` (``*.npy`` files or folders), sorted."""
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


def imagenet_c_transform(image_size, resize, mean, std):
    """The ImageNet validation transform: resize the short side, centre crop, normalise."""
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def _class_folders(folder):
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def check_imagenet_c(root, corruptions, num_classes):
    """Check that every corruption has severity folders 1..5 with the same class folders."""
    reference = None
    for name in corruptions:
        for severity in SEVERITIES:
            folder = os.path.join(root, name, str(severity))
            if not os.path.isdir(folder):
                raise CorruptionError(f"severity folder {folder} is missing; expected "
                                      f"{_layout('imagenet')}")
            classes = _class_folders(folder)
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


# --- evaluation ------------------------------------------------------------------------------------


def evaluate(model, batches, device):
    """Top-1 ``(correct, count)`` of ``model`` over an iterable of ``(images, labels)`` batches."""
    model.eval()
    correct, count = 0, 0
    with torch.no_grad():
        for images, target in batches:
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            correct += int((model(images).argmax(dim=1) == target).sum().item())
            count += int(target.shape[0])
    return correct, count


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
    with open(json_path, "w") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    ce = results["ce"] or {}
    rel = results["relative_ce"] or {}
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["corruption", *(f"acc_s{s}" for s in SEVERITIES), "mean_accuracy", "ce", "relative_ce"])
        for name, row in results["corruptions"].items():
            writer.writerow([name, *(f"{a:.4f}" for a in row["accuracy"]), f"{row['mean_accuracy']:.4f}",
                             _fmt4(ce.get(name)), _fmt4(rel.get(name))])
        writer.writerow(["mean", *(f"{a:.4f}" for a in results["severity_mean_accuracy"]),
                         f"{results['mean_accuracy']:.4f}", _fmt4(results["mce"]),
                         _fmt4(results["relative_mce"])])
    return csv_path


# --- command line ----------------------------------------------------------------------------------


def get_args_parser():
    parser = argparse.ArgumentParser(description="Accuracy and mCE on CIFAR-10-C, CIFAR-100-C or ImageNet-C")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=DATASETS,
                   help="which benchmark; picks the layout and normalisation (default: the checkpoint's "
                        "training dataset)")
    g.add_argument("--data_path", required=True,
                   help="CIFAR-C folder of <corruption>.npy + labels.npy, or ImageNet-C root")
    g.add_argument("--corruptions", nargs="+", default=None, metavar="NAME",
                   help="corruptions to evaluate, space- or comma-separated (default: all in --data_path)")
    g.add_argument("--image_size", type=int, default=None,
                   help=f"ImageNet-C centre crop in pixels (default: {dataset_info('imagenet')['image_size']})")
    g.add_argument("--resize", type=int, default=None,
                   help=f"ImageNet-C short side before the crop, pixels (default: {IMAGENET_RESIZE_PX})")
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
                   help="results JSON; the CSV gets the same stem (default: corruptions_<dataset>.json "
                        "next to the checkpoint)")
    return parser


def severity_loaders(args, dataset, root, corruptions, num_classes, device):
    """Check the data now; return ``loaders(name)`` giving five batch iterables, severity 1..5."""
    info = dataset_info(dataset)
    if dataset == "imagenet":
        check_imagenet_c(root, corruptions, num_classes)
        transform = imagenet_c_transform(args.image_size or info["image_size"], args.resize or IMAGENET_RESIZE_PX,
                                         info["mean"], info["std"])
        return lambda name: [DataLoader(s, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                                        pin_memory=device.type == "cuda")
                             for s in imagenet_c_sets(root, name, transform)]
    images, labels = read_cifar_c(root, corruptions, num_classes)
    return lambda name: [cifar_c_loader(images[name], labels, s, info["mean"], info["std"], args.batch_size)
                         for s in SEVERITIES]


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
    root = os.path.abspath(os.path.expanduser(args.data_path))
    wanted = [c for item in args.corruptions for c in item.split(",") if c] if args.corruptions else None
    corruptions = select_corruptions(root, dataset, wanted)
    device, gpus, notice = pick_device(args.gpus)
    loaders = severity_loaders(args, dataset, root, corruptions, meta["num_classes"], device)
    baseline = read_baseline(args.baseline) if args.baseline else None
    if baseline is not None:
        baseline_errors(baseline, corruptions)  # fail now, not after the whole evaluation
    if notice:
        print(notice)
    model = model.to(device)
    net = torch.nn.DataParallel(model, device_ids=gpus) if len(gpus) > 1 else model

    per_corruption = {}
    for name in corruptions:
        started = time.time()
        try:
            scores = [evaluate(net, loader, device) for loader in loaders(name)]
        except OSError as exc:  # an unreadable or truncated image file of ImageNet-C
            raise CorruptionError(f"cannot read an image of corruption {name}: {exc}") from None
        per_corruption[name] = {"correct": [c for c, _ in scores], "count": [n for _, n in scores]}
        print(f"{name}: {sum(per_corruption[name]['count'])} images in {time.time() - started:.1f} s", flush=True)

    table, mean_accuracy, severity_mean = summarise(per_corruption)
    results = {
        "format_version": FORMAT_VERSION, "dataset": dataset, "data_path": root,
        "checkpoint": os.path.abspath(args.checkpoint), "model": meta["model"],
        "num_classes": meta["num_classes"], "severities": list(SEVERITIES), "corruptions": table,
        "mean_accuracy": mean_accuracy, "mean_error": 100.0 - mean_accuracy,
        "severity_mean_accuracy": severity_mean, "clean_error": args.clean_error,
        "baseline": os.path.abspath(args.baseline) if args.baseline else None,
        "ce": None, "mce": None, "relative_ce": None, "relative_mce": None,
    }
    if baseline is not None:
        results.update(corruption_errors(results, baseline))
        if args.clean_error is not None and results["relative_mce"] is None:
            print(f"baseline {args.baseline} has no clean_error: relative mCE not computed")
    return results


def main(argv=None):
    """Command-line entry point; returns the results dict, or exits with status 1 on bad input."""
    args = get_args_parser().parse_args(argv)
    try:
        results = run(args)
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                       f"corruptions_{results['dataset']}.json")
        try:
            csv_path = write_outputs(results, out)
        except OSError as exc:
            raise CorruptionError(f"cannot write {out} ({exc.strerror}); pass --out FILE.json") from None
    except (CorruptionError, CheckpointError, DataError, DeviceError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        raise SystemExit(1) from None
    print(format_table(results))
    print(f"saved {out} and {csv_path}")
    return results


if __name__ == "__main__":
    main()
