"""Images/s of the two CIFAR training-data paths: DataLoader against ``--gpu_data``.

The DataLoader path decodes and augments each image in worker processes (PIL random crop with 4
pixels of padding, flip, normalise) and copies every batch to the device; ``--gpu_data`` keeps the
uint8 training set on the device and does the same augmentation there (``utils.device_data``).
Both loaders come from the training script's own builder (``utils.trainer.build_loaders``) and
are timed as training uses them: a fresh pass over the shuffled training set (iterator start-up,
worker processes included), each batch on the device before the clock stops. Medians over rounds.

    python -m tools.bench_loader --data_path ./data --dataset cifar10 --device cuda -b 256 -j 0 4 8

Without CIFAR-10 on disk, ``--write_synthetic DIR`` first writes a synthetic training and test set
in CIFAR-10's own pickle format (50,000 + 10,000 random images) under ``DIR``, then times it::

    python -m tools.bench_loader --write_synthetic /tmp/cifar_synth --data_path /tmp/cifar_synth -j 0 2
"""
if __package__ in (None, ""):  # run as a file: the imports below need the repository root on the path
    import sys
    sys.exit("run the tools from the repository root as modules: python -m tools.bench_loader "
             + " ".join(sys.argv[1:]))

import argparse
import os
import pickle
import statistics
import time

import numpy as np
import torch

from tools.bench import hardware, sync
from utils.data import DataError, build_datasets, build_loaders
from utils.distributed import Runtime

SYNTHETIC_SPLITS = {"data_batch_1": 10000, "data_batch_2": 10000, "data_batch_3": 10000, "data_batch_4": 10000,
                    "data_batch_5": 10000, "test_batch": 10000}
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_synthetic_cifar10(root, seed=0):
    """Random images and labels in CIFAR-10's pickle format under ``root/cifar-10-batches-py``.

    Refuses to write into a folder that already holds files."""
    folder = os.path.join(root, "cifar-10-batches-py")
    if os.path.isdir(folder) and os.listdir(folder):
        raise SystemExit(f"bench_loader: {folder} already holds files; pass another --write_synthetic folder")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, count in SYNTHETIC_SPLITS.items():
        entry = {b"data": rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, size=count)], b"batch_label": name.encode()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR10_LABELS]}, f, protocol=2)
    return folder


def time_pass(loader, device, batches):
    """Seconds and images for one pass over at most ``batches`` batches (all when 0), on ``device``."""
    sync(device)
    start = time.perf_counter()
    images_seen = 0
    for i, (images, target) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        images_seen += len(target)
        if batches and i + 1 == batches:
            break
    sync(device)
    return time.perf_counter() - start, images_seen


def run(args):
    device = torch.device(args.device)
    runtime = Runtime(device, [device.index or 0] if device.type == "cuda" else [])
    try:
        train_set, val_set, _ = build_datasets(args.dataset, args.data_path)
    except DataError as err:
        raise SystemExit(f"bench_loader: {err}") from None
    paths = [("DataLoader", False, j) for j in args.workers] + [("--gpu_data", True, 0)]
    print(f"# device: {hardware(device)}; torch {torch.__version__}; {args.dataset} train set "
          f"{len(train_set)} images; batch {args.batch_size}; rounds {args.rounds}")
    rows = []
    for label, gpu_data, workers in paths:
        flags = argparse.Namespace(batch_size=args.batch_size, batch_size_test=args.batch_size, workers=workers,
                                   gpu_data=gpu_data, dataset=args.dataset, seed=0)
        train, _, generator = build_loaders(train_set, val_set, flags, runtime)
        rates, counts = [], set()
        for r in range(args.rounds + 1):
            generator.manual_seed(r)
            seconds, seen = time_pass(train, device, args.batches)
            if r:                         # round 0 warms up (page cache, CUDA context, kernels)
                rates.append(seen / seconds)
                counts.add(seen)
        rows.append({"path": label, "workers": workers if not gpu_data else "-", "images": counts.pop(),
                     "img_s": statistics.median(rates)})
    base = rows[0]["img_s"]
    print("| path | workers | images per pass | images/s | / first row |")
    print("|---|---|---|---|---|")
    for row in rows:
        row["ratio"] = row["img_s"] / base
        print(f"| {row['path']} | {row['workers']} | {row['images']} | {row['img_s']:.0f} | {row['ratio']:.2f} |")
    return rows


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_path", required=True, help="folder with the CIFAR python batches (as for main.py)")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("-b", "--batch_size", type=int, default=256, help="batch size (default 256, the CIFAR recipe)")
    p.add_argument("-j", "--workers", type=int, nargs="+", default=[4],
                   help="DataLoader worker counts to time, one row each (default 4)")
    p.add_argument("--batches", type=int, default=0, help="batches per pass (default 0: the whole epoch)")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per path after one warm-up (default 3)")
    p.add_argument("--write_synthetic", metavar="DIR", default=None,
                   help="first write a synthetic CIFAR-10 (random images, the real file format) under DIR")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.batch_size < 2 or args.rounds < 1 or args.batches < 0 or min(args.workers) < 0:
        raise SystemExit("bench_loader: --batch_size must be >= 2, --rounds >= 1, --batches and -j >= 0")
    if args.write_synthetic:
        print(f"wrote {write_synthetic_cifar10(args.write_synthetic)}")
    return run(args)


if __name__ == "__main__":
    main()
