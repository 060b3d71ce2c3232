"""Measure the LCR share of the total loss at initialisation, the number behind ``LCR_SCALE``.

For each model, a freshly initialised network (EDE schedule of epoch 0) sees one batch of
standard-normal images with random labels; the script prints CE, the unweighted ``L_LCR``, and
``alpha * c * L_LCR / (CE + alpha * c * L_LCR)`` for the chosen alpha and ``c = LCR_SCALE``.

    python -m tools.lcr_share --alpha 8
"""
if __package__ in (None, ""):  # run as a file: the imports below need the repository root on the path
    import sys
    sys.exit("run the tools from the repository root as modules: python -m tools.lcr_share " + " ".join(sys.argv[1:]))

import argparse

import torch
import torch.nn.functional as F

import models
from modules import set_ede_schedule
from modules.lcr import LCR_SCALE, LipschitzRegularizer

BATCH = {"cifar": 64, "imagenet": 8}  # images per measurement batch, by the model's family


def measure(name, alpha, seed, scale=LCR_SCALE):
    """(CE, L_LCR, share) for model ``name`` at initialisation, on its family's input size and classes."""
    info = models.model_info(name)
    classes, side, batch = info.num_classes, info.image_size, BATCH[info.family]
    torch.manual_seed(seed)
    model = models.create_model(name, num_classes=classes)
    set_ede_schedule(model, 0, 1)
    reg = LipschitzRegularizer(model)
    x = torch.randn(batch, 3, side, side)
    y = torch.randint(0, classes, (batch,))
    with torch.no_grad(), reg.record():
        logits = model(x)
    ce = F.cross_entropy(logits, y).item()
    lcr = reg.loss()[0].item()
    return ce, lcr, alpha * scale * lcr / (ce + alpha * scale * lcr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alpha", type=float, default=8.0, help="LCR weight (default 8)")
    binary = models.list_models(binary=True)
    p.add_argument("--models", nargs="+", default=binary, choices=binary,
                   help="models to measure (default: every binary model)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    print(f"LCR_SCALE c = {LCR_SCALE}, alpha = {args.alpha}")
    print(f"{'model':<20} {'CE':>7} {'L_LCR':>7} {'share %':>8}")
    for name in args.models:
        ce, lcr, share = measure(name, args.alpha, args.seed)
        print(f"{name:<20} {ce:7.3f} {lcr:7.4f} {100 * share:8.2f}")


if __name__ == "__main__":
    main()
