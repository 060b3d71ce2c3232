"""Images/s of the two CIFAR training-data paths: DataLoader against ``--gpu_data``.

The DataLoader path decodes and augments each image in worker processes (PIL random crop with 4
pixels of padding, flip, normalise) and copies every batch to the device; ``--gpu_data`` keeps the
uint8 training set on the device and does the same augmentation there (``utils.device_data``).
Both loaders come from the training script's own builder (``utils.trainer.build_loaders``) and
are timed as training uses them: a fresh pass over the shuffled training set (iterator start-up,
worker processes included), each batch on the device before the clock stops. Medians over rounds.

    python -m tools.bench_loader --data_path ./data --dataset cifar10 --device cuda -b 256 -j 0 4 8
"""
import argparse
import statistics
import time

import torch

from tools.bench import hardware, sync
from utils.data import DataError, build_datasets
from utils.distributed import Runtime
from utils.trainer import build_loaders


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
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.batch_size < 1 or args.rounds < 1 or args.batches < 0 or min(args.workers) < 0:
        raise SystemExit("bench_loader: --batch_size and --rounds must be >= 1, --batches and -j >= 0")
    return run(args)


if __name__ == "__main__":
    main()
