"""How close the regulariser's singular values and gradient are to the exact ones, on real retention matrices.

The paper form needs, for every retention matrix of the chain, the largest singular value and its
vectors (``modules.singular.top_singular``, docs/METHOD.md section 3). This tool records one forward
pass of a network (freshly initialised, or from ``--checkpoint``), builds every retention matrix of
the chain (binary: the signs; real: the activations), and compares the solver at its default
setting (or ``--steps``) with an exact float64 SVD (``torch.linalg.svd``). Per case it prints:

- the median and maximum relative error of sigma, and the fraction of matrices above 1 %, for the
  binary and the real side;
- the median and 90th percentile of ``sigma_2 / sigma_1`` (power iteration converges like
  ``(sigma_2 / sigma_1) ** (2 k)``, which is why a single vector is not enough);
- the cosine between the gradient of ``L_LCR`` with the solver's values and vectors and with the
  exact ones: with respect to the binary retention matrices (``coef u v^T``, all pairs and samples)
  and with respect to the binary activations (through ``RM = pool(X) Y^T / N``), both in float64.

    python -m tools.lcr_power_error                                   # ResNet-20 on digits, ResNet-18 IR
    python -m tools.lcr_power_error --model resnet20_1w1a --checkpoint results/resnet20_1w1a/model_best.pth.tar
    python -m tools.lcr_power_error --model resnet20_1w1a --steps 1 2 4 6 --block 1 4
"""
if __package__ in (None, ""):  # run as a file: the imports below need the repository root on the path
    import sys
    sys.exit("run the tools from the repository root as modules: python -m tools.lcr_power_error "
             + " ".join(sys.argv[1:]))

import argparse

import torch
import torch.nn.functional as F

import models
from modules.binary import BinarizeConv2d, set_ede_schedule
from modules.lcr import LCRTap, pool_to
from modules.singular import top_singular
from utils.checkpoint import load_model_weights, load_file
from utils.data import DigitsDataset

DEFAULT_CASES = (("resnet20_1w1a", 64), ("resnet18_1w1a_IR", 4))   # (model, images)


def record_chain(model, x, dtype=torch.float64):
    """The real activations of the LCR chain (every binary layer's input, then the tap's), in ``dtype``."""
    acts, hooks = [], []
    for m in model.modules():
        if isinstance(m, BinarizeConv2d):
            hooks.append(m.input_quantizer.register_forward_hook(lambda mod, a, out: acts.append(a[0].detach())))
        elif isinstance(m, LCRTap):
            hooks.append(m.register_forward_hook(lambda mod, a, out: acts.append(a[0].detach())))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [a.to(dtype) for a in acts]


def sign(x):
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def flat_rm(x, y):
    """``RM = pool(X) Y^T / N`` (differentiable, float64)."""
    xf = pool_to(x, y.shape[-2:]).flatten(2)
    yf = y.flatten(2)
    return torch.bmm(xf, yf.transpose(1, 2)) / yf.shape[2]


def lcr_gradients(signs, vectors, sigma_f):
    """Gradient of ``L_LCR`` w.r.t. the binary retention matrices and activations, with sigma_B = u^T RM v
    for the given fixed ``vectors`` (per pair: u, v) and ``sigma_f`` (per pair: B values)."""
    leaves = [s.clone().requires_grad_(True) for s in signs]
    k_pairs, total = len(signs) - 1, signs[0].shape[0]
    rms, loss = [], 0.0
    for k in range(k_pairs):
        rm = flat_rm(leaves[k], leaves[k + 1])
        rm.retain_grad()
        rms.append(rm)
        u, v = vectors[k]
        sigma_b = torch.einsum("bi,bij,bj->b", u, rm, v)
        loss = loss + ((sigma_b / sigma_f[k] - 1) ** 2).sum()
    (loss / (k_pairs * total)).backward()
    return torch.cat([r.grad.flatten() for r in rms]), torch.cat([leaf.grad.flatten() for leaf in leaves])


def cosine(a, b):
    return float(F.cosine_similarity(a, b, dim=0))


def measure(acts, steps, block):
    """The figures of the module docstring for one chain of activations and one solver setting."""
    signs = [sign(a) for a in acts]
    sides = {"binary": signs, "real": acts}
    solved, exact, errors = {}, {}, {}
    for side, chain in sides.items():
        solved[side], exact[side] = [], []
        for x, y in zip(chain[:-1], chain[1:]):
            rm = flat_rm(x, y)
            solved[side].append(tuple(t.double() for t in top_singular(rm.float(), steps, block)))
            u, s, vh = torch.linalg.svd(rm)
            exact[side].append((s[:, 0], u[:, :, 0], vh[:, 0, :], s))
        est = torch.cat([t[0] for t in solved[side]])
        ref = torch.cat([t[0] for t in exact[side]])
        errors[side] = (est - ref).abs() / ref
    gaps = torch.cat([t[3][:, 1] / t[3][:, 0] for t in exact["binary"] + exact["real"]])
    g_rm, g_act = lcr_gradients(signs, [(u, v) for _, u, v in solved["binary"]], [t[0] for t in solved["real"]])
    e_rm, e_act = lcr_gradients(signs, [(u, v) for _, u, v, _ in exact["binary"]], [t[0] for t in exact["real"]])
    return {"errors": errors, "gap_median": float(gaps.median()), "gap_p90": float(gaps.quantile(0.9)),
            "cos_rm": cosine(g_rm, e_rm), "cos_act": cosine(g_act, e_act), "matrices": len(gaps)}


def inputs(name, count, seed):
    """Digits test images for CIFAR-size networks, standard-normal images for ImageNet-size ones."""
    info = models.model_info(name)
    if info.family == "cifar":
        test = DigitsDataset(train=False)
        return torch.stack([test[i][0] for i in range(count)])
    return torch.randn(count, 3, info.image_size, info.image_size, generator=torch.Generator().manual_seed(seed))


def network(name, checkpoint, seed):
    torch.manual_seed(seed)
    info = models.model_info(name)
    obj = load_file(checkpoint) if checkpoint else None
    classes = obj["num_classes"] if obj is not None and "num_classes" in obj else info.num_classes
    model = models.create_model(name, num_classes=classes)
    if obj is not None:
        load_model_weights(model, obj, checkpoint, name, classes)
    else:
        set_ede_schedule(model, 0, 1)
    return model.train()        # BatchNorm as the regulariser sees it: batch statistics


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, choices=models.list_models(binary=True),
                   help="one network (default: ResNet-20 on 64 digits images and ImageNet ResNet-18 on 4 random "
                        "images)")
    p.add_argument("--checkpoint", default=None, help="weights to load (default: a fresh initialisation)")
    p.add_argument("--images", type=int, default=None, help="images in the recorded batch")
    p.add_argument("--steps", type=int, nargs="+", default=[0], help="block power steps; 0: the default by size")
    p.add_argument("--block", type=int, nargs="+", default=[0], help="vectors per block; 0: the default by size")
    p.add_argument("--seed", type=int, default=0, help="initialisation and input seed (default 0)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    cases = [(args.model, args.images or dict(DEFAULT_CASES).get(args.model, 16))] if args.model else DEFAULT_CASES
    print("| model | weights | steps | block | matrices | sigma_2/sigma_1 median, p90 | side | median error | "
          "max error | > 1 % | gradient cosine (RM, activations) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, count in cases:
        model = network(name, args.checkpoint if args.model else None, args.seed)
        acts = record_chain(model, inputs(name, count, args.seed))
        for steps in args.steps:
            for block in args.block:
                r = measure(acts, steps or None, block or None)
                for side, err in r["errors"].items():
                    print(f"| {name} | {args.checkpoint or 'initial'} | {steps or 'default'} | {block or 'default'} | "
                          f"{r['matrices']} | {r['gap_median']:.3f}, {r['gap_p90']:.3f} | {side} | "
                          f"{float(err.median()):.1e} | {float(err.max()):.1e} | "
                          f"{float((err > 0.01).double().mean()):.1%} | "
                          f"{r['cos_rm']:.4f}, {r['cos_act']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
