"""Measure the LCR share of the total loss at initialisation, the number behind ``LCR_SCALE``.

For each model, a freshly initialised network (EDE schedule of epoch 0) sees one batch of
standard-normal images with random labels; the script prints CE, the unweighted ``L_LCR``, and
``alpha * c * L_LCR / (CE + alpha * c * L_LCR)`` for the chosen alpha and ``c = LCR_SCALE``.

    python -m tools.lcr_share --alpha 8
"""
import argparse

import torch
import torch.nn.functional as F

import models
from modules import set_ede_schedule
from modules.lcr import LCR_SCALE, LipschitzRegularizer

CASES = {  # name: (classes, batch, image side in pixels)
    "resnet20_1w1a": (10, 128, 32),
    "resnet18_1w1a": (10, 64, 32),
    "vgg_small_1w1a": (10, 64, 32),
    "resnet18_1w1a_IR": (1000, 16, 224),
    "resnet34_1w1a_IR": (1000, 8, 224),
}


def measure(name, alpha, seed, scale=LCR_SCALE):
    """(CE, L_LCR, share) for model ``name`` at initialisation."""
    classes, batch, side = CASES[name]
    torch.manual_seed(seed)
    model = models.create_model(name, num_classes=classes)
    set_ede_schedule(model, 0, 1)
    reg = LipschitzRegularizer(model)
    x = torch.randn(batch, 3, side, side)
    y = torch.randint(0, classes, (batch,))
    with torch.no_grad(), reg.record():
        logits = model(x)
    ce = F.cross_entropy(logits, y).item()
    lcr = reg.loss().item()
    return ce, lcr, alpha * scale * lcr / (ce + alpha * scale * lcr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alpha", type=float, default=8.0, help="LCR weight (default 8)")
    p.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES), help="models to measure")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    print(f"LCR_SCALE c = {LCR_SCALE}, alpha = {args.alpha}")
    print(f"{'model':<20} {'CE':>7} {'L_LCR':>7} {'share %':>8}")
    for name in args.models:
        ce, lcr, share = measure(name, args.alpha, args.seed)
        print(f"{name:<20} {ce:7.3f} {lcr:7.4f} {100 * share:8.2f}")


if __name__ == "__main__":
    main()
