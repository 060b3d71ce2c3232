"""Time each speed trick's helper against its plain formula on the work of one training step.

    python -m tools.bench_tricks --model resnet20_1w1a --batch 128 --threads 1 --reps 15

One forward pass of a fresh network records the LCR chain (the input of every binary convolution
and the tap); then, for each trick of ``modules/speed.py``, the helper runs on what one training
step gives it (``sign``: every chain activation; ``pool``: the pairs whose X is pooled; ``group`` and
``chunks``: the singular triplets of all retention matrices, binary and real; ``slope``: the tanh
slope times a gradient of every chain activation), alternately with the trick on and off, ``--reps``
times. The ratio is the median of the per-repetition ratios (plain / trick), so load on a shared
machine hits both alike. ``tools.bench --plain NAME`` times the whole step instead, where a helper's
gain can drown in the noise of a loaded machine.
"""
if __package__ in (None, ""):  # run as a file: the imports below need the repository root on the path
    import sys
    sys.exit("run the tools from the repository root as modules: python -m tools.bench_tricks "
             + " ".join(sys.argv[1:]))

import argparse
import statistics
import sys
import time

import torch

import models
from modules import speed
from modules.binary import two_valued_sign
from modules.lcr import _flat_pair, pool_to, times_tanh_slope_, top_singular_of_pairs
from tools.lcr_power_error import record_chain


def chain_of(name, batch, seed=0):
    """The chain activations (fp32) of one forward pass of a fresh ``name`` on random images."""
    torch.manual_seed(seed)
    info = models.model_info(name)
    model = models.create_model(name, num_classes=info.num_classes)
    return record_chain(model, torch.randn(batch, 3, info.image_size, info.image_size), torch.float32)


def workloads(acts):
    """``{trick: callable doing one step's share of that helper's work}``."""
    signs = [two_valued_sign(a) for a in acts]
    pairs = [_flat_pair(a, b) for a, b in zip(acts[:-1], acts[1:])]
    pairs += [_flat_pair(a, b) for a, b in zip(signs[:-1], signs[1:])]
    pooled = [(a, b.shape[-2:]) for a, b in zip(acts[:-1], acts[1:]) if a.shape[-1] > b.shape[-1]]
    grads = [torch.randn_like(a) for a in acts]
    return {
        "sign": lambda: [two_valued_sign(a) for a in acts],
        "pool": lambda: [pool_to(a, size) for a, size in pooled],
        "group": lambda: top_singular_of_pairs(pairs),
        "chunks": lambda: top_singular_of_pairs(pairs),
        "slope": lambda: [times_tanh_slope_(g.clone(), a) for g, a in zip(grads, acts)],
    }


def measure(work, name, reps):
    """``(trick ms, plain ms, plain / trick)``: medians over ``reps`` alternating repetitions."""
    on, off = [], []
    for i in range(reps + 1):
        start = time.perf_counter()
        work()
        fast = time.perf_counter() - start
        with speed.plain_formulas(name):
            start = time.perf_counter()
            work()
            plain = time.perf_counter() - start
        if i:  # the first pair warms both paths up
            on.append(fast)
            off.append(plain)
    return (statistics.median(on) * 1e3, statistics.median(off) * 1e3,
            statistics.median(b / a for a, b in zip(on, off)))


def get_args_parser():
    p = argparse.ArgumentParser(prog="python -m tools.bench_tricks", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20_1w1a", choices=models.list_models(binary=True))
    p.add_argument("--batch", type=int, default=128, help="images in the recorded batch (default 128)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--reps", type=int, default=15, help="alternating repetitions (default 15)")
    p.add_argument("--tricks", nargs="+", choices=speed.TRICKS, default=list(speed.TRICKS))
    return p


def main(argv=None):
    p = get_args_parser()
    args = p.parse_args(argv)
    if args.batch < 1 or args.threads < 1 or args.reps < 1:
        p.error("--batch, --threads and --reps must be positive")
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        work = workloads(chain_of(args.model, args.batch))
        print(f"# {args.model}, batch {args.batch}, {args.threads} thread(s), {args.reps} repetitions; CPU")
        print("| trick | helper with the trick (ms) | plain formula (ms) | plain / trick |")
        print("|---|---|---|---|")
        rows = []
        for name in args.tricks:
            fast, plain, ratio = measure(work[name], name, args.reps)
            rows.append({"trick": name, "trick_ms": fast, "plain_ms": plain, "ratio": ratio})
            print(f"| {name} | {fast:.1f} | {plain:.1f} | {ratio:.2f} |", flush=True)
    finally:
        torch.set_num_threads(before)
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
