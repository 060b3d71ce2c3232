"""Per pair of the LCR chain of trained networks: the scale of the real input and both spectral norms.

    python -m tools.chain_stats RUN/model_best.pth.tar RUN/checkpoint.pth.tar [...] [--images 128]

For each checkpoint, one forward pass in training mode (BatchNorm on batch statistics, as the
regulariser sees the network) of the first ``--images`` digits test images (CIFAR-size networks) or
of random images (ImageNet-size ones) records the chain ``A^0 .. A^K`` (docs/METHOD.md section 3).
For each pair ``k`` it prints, as means over the images: ``mean abs(A)`` of the pair's real input
``A^{k-1}``, ``sigma_F`` and ``sigma_B`` (the largest singular values of the real and the binary
retention matrices, ``modules.singular.top_singular``) and their ratio. A paper-form network whose
real activations shrank has a small ``mean abs(A)`` and ``sigma_F`` where ``sigma_B``, computed from
signs, stays put (docs/RESULTS.md section 2). Nothing is written; weights are not changed on disk.
"""
if __package__ in (None, ""):  # run as a file: the imports below need the repository root on the path
    import sys
    sys.exit("run the tools from the repository root as modules: python -m tools.chain_stats "
             + " ".join(sys.argv[1:]))

import argparse
import sys

import torch

from modules.binary import two_valued_sign
from modules.lcr import retention_matrix
from modules.singular import top_singular
from tools.lcr_power_error import inputs, record_chain
from utils.checkpoint import CheckpointError, read_model


def chain_stats(model, images):
    """``{"mean abs(A)": [...], "sigma_F": [...], "sigma_B": [...], "ratio": [...]}``, one value per pair."""
    acts = record_chain(model.train(), images, torch.float32)
    stats = {"mean abs(A)": [], "sigma_F": [], "sigma_B": [], "ratio": []}
    for x, y in zip(acts[:-1], acts[1:]):
        sigma_f = top_singular(retention_matrix(x, y))[0]
        sigma_b = top_singular(retention_matrix(two_valued_sign(x), two_valued_sign(y)))[0]
        stats["mean abs(A)"].append(float(x.abs().mean()))
        stats["sigma_F"].append(float(sigma_f.mean()))
        stats["sigma_B"].append(float(sigma_b.mean()))
        stats["ratio"].append(float((sigma_b / sigma_f.clamp_min(1e-12)).mean()))
    return stats


def get_args_parser():
    p = argparse.ArgumentParser(prog="python -m tools.chain_stats", description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoints of binary networks (training or best)")
    p.add_argument("--images", type=int, default=128, help="images in the recorded batch (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of random images for ImageNet-size networks")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.images < 2:
        sys.exit(f"error: --images must be at least 2 (BatchNorm needs a batch), got {args.images}")
    header = None
    for path in args.checkpoints:
        try:
            model, meta = read_model(path)
        except CheckpointError as exc:
            sys.exit(f"error: {exc}")
        with torch.no_grad():
            stats = chain_stats(model, inputs(meta["model"], args.images, args.seed))
        if header is None:
            header = len(stats["ratio"])
            print("| checkpoint | per pair | " + " | ".join(str(k + 1) for k in range(header)) + " |")
            print("|---|---|" + "---|" * header)
        for name, values in stats.items():
            print(f"| {path} | {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
