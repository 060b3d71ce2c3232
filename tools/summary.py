"""Per-layer bit widths, parameters, memory, BOPs and FLOPs of a zoo model, counted as BNN papers count them.

    python -m tools.summary resnet18_1w1a_IR                  # ImageNet models: 1000 classes, 224 px
    python -m tools.summary resnet20_1w1a --image_size 32 --num_classes 100
    python -m tools.summary --readme                          # the README's table, every binary model

What is counted (one image, one forward at the given input size; Bi-Real Net, ReActNet and LCR-BNN
use the same rules):

- BOPs: multiply-accumulates of the binary convolutions (1-bit weights x 1-bit activations),
  ``H_out * W_out * C_out * C_in / groups * kh * kw`` each.
- FLOPs: multiply-accumulates of the full-precision convolutions (stem, 1x1 downsampling) and of the
  linear classifier; one MAC counts as one FLOP, as in those papers.
- ``OPs = BOPs / 64 + FLOPs``: a 64-bit CPU does 64 binary operations per XNOR/popcount instruction.
- Not counted, as in the papers: batch norm, hardtanh, residual adds, pooling, the sign of the
  activations and the per-filter power-of-two scale (one shift or multiply per output, folded into the
  batch norm on export).
- params: parameters (a batch norm has weight and bias; running statistics are buffers); memory:
  ``params * weight bits / 8`` bytes, 1 bit for binary conv weights and 32 for everything else, which
  is how Bi-Real Net reports memory (33.6 Mbit for ResNet-18). The packed file of ``tools.export``
  is a little larger: it also keeps a one-byte exponent per binary filter, pads each filter's bits to a
  whole byte, keeps the batch norms that cannot be folded, and has a container overhead of a few kB.

Published totals (Bi-Real Net, ECCV 2018, Table 4; repeated by ReActNet and LCR-BNN): ResNet-18
1.63e8 OPs, ResNet-34 1.93e8 OPs. The architecture gives 1.6763e9 BOPs and 1.3779e8 FLOPs (stem
1.1801e8, three 1x1 downsampling convs 1.927e7, fc 5.12e5) for our ResNet-18, so 1.640e8 OPs
(+0.6 %; without the fc it would be 1.635e8), and 3.5260e9 BOPs, the same FLOPs and 1.929e8 OPs for
ResNet-34 (-0.05 %). The published numbers have three significant digits and do not say whether the
classifier is in them; both explain a difference below 1 %. Our IR ResNets keep the stem and the 1x1
downsampling convolutions in full precision, as Bi-Real Net does.
"""
if __package__ in (None, ""):  # run as a file: the imports below need the repository root on the path
    import sys
    sys.exit("run the tools from the repository root as modules: python -m tools.summary " + " ".join(sys.argv[1:]))

import argparse
import math
import os
import sys
import tempfile

import torch
import torch.nn as nn

import models
from modules.binary import BinarizeConv2d
from tools.export import export_packed, fp32_size_bytes, input_spec

__all__ = ["BOPS_PER_OP", "PUBLISHED_OPS", "layer_costs", "cost_summary", "readme_rows", "main"]

BOPS_PER_OP = 64  # binary operations one 64-bit instruction does (XNOR-Net, Bi-Real Net)
FP_BITS = 32
BINARY_BITS = 1
PUBLISHED_OPS = {"resnet18_1w1a_IR": 1.63e8, "resnet34_1w1a_IR": 1.93e8}  # Bi-Real Net, Table 4


def _layer_row(name, module, output):
    """Cost row of one conv / linear / batch-norm module given its output for one image."""
    params = sum(p.numel() for p in module.parameters(recurse=False))
    row = {"name": name, "type": type(module).__name__, "weight_bits": FP_BITS, "act_bits": FP_BITS,
           "params": params, "memory_bytes": params * FP_BITS / 8, "bops": 0, "flops": 0}
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        macs = output[0].numel() * module.in_channels // module.groups * kh * kw
        if isinstance(module, BinarizeConv2d):
            weight = module.weight.numel()
            row.update(weight_bits=BINARY_BITS, act_bits=BINARY_BITS, bops=macs,
                       memory_bytes=(weight * BINARY_BITS + (params - weight) * FP_BITS) / 8)
        else:
            row["flops"] = macs
    elif isinstance(module, nn.Linear):
        row["flops"] = output[0].numel() * module.in_features
    else:
        row["act_bits"] = None
    return row


def layer_costs(model, image_size, channels=3):
    """One cost row per conv, linear and batch-norm module of ``model``, in call order."""
    rows, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: rows.append(_layer_row(name, mod, out))))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, image_size, image_size, device=device))
    finally:
        for h in handles:
            h.remove()
    return rows


def cost_summary(model_name, num_classes=None, image_size=None):
    """Per-layer rows and totals (params, memory_bytes, bops, flops, ops) of a zoo model.

    Defaults come from :func:`tools.export.input_spec` (ImageNet: 1000 classes at 224 px, CIFAR: 10
    at 32 px). Only shapes matter, so the model is built on the ``meta`` device: no weights, no maths.
    """
    default_classes, default_size = input_spec(model_name)
    num_classes = default_classes if num_classes is None else num_classes
    image_size = default_size if image_size is None else image_size
    with torch.device("meta"):
        model = models.create_model(model_name, num_classes=num_classes)
    rows = layer_costs(model, image_size)
    totals = {k: sum(r[k] for r in rows) for k in ("params", "memory_bytes", "bops", "flops")}
    totals["ops"] = totals["bops"] / BOPS_PER_OP + totals["flops"]
    return {"model": model_name, "num_classes": num_classes, "image_size": image_size,
            "layers": rows, **totals}


def _sci(x, digits=3):
    if x == 0:
        return "0"
    exp = math.floor(math.log10(abs(x)))
    return f"{x / 10 ** exp:.{digits - 1}f}e{exp}"


def format_summary(summary):
    """The per-layer table and totals as text."""
    head = f"{'layer':<28} {'type':<15} {'W':>3} {'A':>3} {'params':>10} {'memory B':>11} {'BOPs':>10} {'FLOPs':>10}"
    lines = [f"{summary['model']}: {summary['num_classes']} classes, "
             f"{summary['image_size']}x{summary['image_size']} input, batch 1", head, "-" * len(head)]
    for r in summary["layers"]:
        act = "-" if r["act_bits"] is None else r["act_bits"]
        lines.append(f"{r['name']:<28} {r['type']:<15} {r['weight_bits']:>3} {act:>3} {r['params']:>10,} "
                     f"{r['memory_bytes']:>11,.0f} {_sci(r['bops']):>10} {_sci(r['flops']):>10}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<28} {'':<15} {'':>3} {'':>3} {summary['params']:>10,} "
                 f"{summary['memory_bytes']:>11,.0f} {_sci(summary['bops'], 4):>10} {_sci(summary['flops'], 4):>10}")
    lines.append(f"memory {summary['memory_bytes'] * 8 / 1e6:.2f} Mbit; OPs = BOPs / {BOPS_PER_OP} + FLOPs "
                 f"= {_sci(summary['ops'], 4)} (batch norm, activations, adds and pooling not counted)")
    published = PUBLISHED_OPS.get(summary["model"])
    if published and summary["image_size"] == 224 and summary["num_classes"] == 1000:
        lines.append(f"published (Bi-Real Net): {_sci(published)} OPs; ours differ by "
                     f"{100 * (summary['ops'] / published - 1):+.2f} %")
    return "\n".join(lines)


def readme_rows(names=None):
    """Markdown table: fp32 and packed sizes, compression, BOPs, FLOPs, OPs of every binary model.

    Sizes are of freshly initialised networks at their default classes (they do not depend on the
    weights): ``torch.save(state_dict)`` against the file ``python -m tools.export`` writes.
    """
    names = names or [n for n in models.list_models() if "1w1a" in n]
    lines = ["| model | classes, input | fp32 state dict | packed | compression | BOPs | FLOPs | OPs |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            classes, side = input_spec(name)
            torch.manual_seed(0)
            model = models.create_model(name, num_classes=classes).eval()
            path = os.path.join(tmp, f"{name}.pt")
            torch.save(export_packed(model, name, classes), path)
            fp32, packed = fp32_size_bytes(model), os.path.getsize(path)
            s = cost_summary(name, classes, side)
            lines.append(f"| `{name}` | {classes}, {side} px | {fp32 / 1e6:.2f} MB | {packed / 1e6:.3f} MB | "
                         f"{fp32 / packed:.1f}x | {_sci(s['bops'])} | {_sci(s['flops'])} | {_sci(s['ops'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", choices=models.list_models(), help="registry name")
    p.add_argument("--num_classes", type=int, default=None,
                   help="classifier width (default: 1000 for ImageNet models, 10 otherwise)")
    p.add_argument("--image_size", type=int, default=None,
                   help="input side in pixels (default: 224 for ImageNet models, 32 otherwise)")
    p.add_argument("--readme", action="store_true", help="print the README table for every binary model")
    args = p.parse_args(argv)
    if args.readme:
        print(readme_rows())
    elif args.model:
        print(format_summary(cost_summary(args.model, args.num_classes, args.image_size)))
    else:
        p.error("give a MODEL or --readme")
    return 0


if __name__ == "__main__":
    sys.exit(main())
