"""How far the LCR power iteration is from the exact top singular value on real retention matrices.

``modules.lcr.pair_sigma`` estimates ``sigma(RM)`` with ``--lcr_iters`` power iterations (default 5,
METHOD.md section 3). This script records one forward pass of a freshly initialised binary network,
builds every retention matrix of the LCR chain (binary: the signs; real: the activations), and
compares ``pair_sigma(X, Y, iters)`` with ``torch.linalg.matrix_norm(RM, ord=2)`` computed in
float64. It prints, per case, form (binary / real) and iteration count, the median and maximum
relative error over all layers and samples, the fraction of (layer, sample) pairs whose error is
above 1 %, the median and maximum ``sigma_2 / sigma_1`` (the power iteration converges like
``(sigma_2 / sigma_1) ** (2 iters)``), and the relative error that this causes in the loss
``mean (sigma_B / sigma_F - 1) ** 2`` (one value per case and iteration count, shown on both rows).

Cases (random init, random normal input):

- ``resnet20``: ``resnet20_1w1a``, 32 x 32, batch 32, EDE buffers at their defaults (t = k = 1);
- ``resnet20_ep0``: the same with ``set_ede_schedule(model, 0, E)`` (t = 1e-3, k = 1000). t and k
  only change the backward pass, so its numbers equal those of ``resnet20``;
- ``resnet18_IR``: ``resnet18_1w1a_IR``, 112 x 112, batch 4.

Usage::

    python -m tools.lcr_power_error                   # iters 5
    python -m tools.lcr_power_error --iters 1 5 20 100 --seed 1
"""
import argparse

import torch

from models import create_model
from modules.binary import BinarizeConv2d, set_ede_schedule
from modules.lcr import LCRTap, pair_sigma, retention_matrix

# name: (model, image size in pixels, batch size, set the epoch-0 EDE schedule)
CASES = {
    "resnet20": ("resnet20_1w1a", 32, 32, False),
    "resnet20_ep0": ("resnet20_1w1a", 32, 32, True),
    "resnet18_IR": ("resnet18_1w1a_IR", 112, 4, False),
}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, nargs="+", default=[5],
                        help="power-iteration counts to evaluate (default: 5, the --lcr_iters default)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES),
                        help=f"which networks to record (default: all of {', '.join(CASES)})")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default: 0)")
    parser.add_argument("--epochs", type=int, default=400,
                        help="E of the EDE schedule for the *_ep0 case (default: 400; "
                             "epoch 0 gives t = Tmin)")
    return parser


def record_chain(model, x):
    """Real inputs of every main-path binary conv and the LCR tap, in forward order (one forward pass)."""
    acts, handles = [], []
    for m in model.modules():
        if (isinstance(m, BinarizeConv2d) and m.lcr_chain) or isinstance(m, LCRTap):
            handles.append(m.register_forward_pre_hook(lambda mod, inp: acts.append(inp[0].detach())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return acts


def sign(x):
    """sign with sign(0) = +1, as the binary layers compute it."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def measure(acts, iters):
    """Per form: relative errors (K*B), sigma_2/sigma_1 (K*B), estimated and exact sigmas (K x B)."""
    out = {}
    for form, f in (("binary", sign), ("real", lambda z: z)):
        est, exact, gap = [], [], []
        for a, b in zip(acts[:-1], acts[1:]):
            xa, xb = f(a), f(b)
            sv = torch.linalg.svdvals(retention_matrix(xa, xb).double())
            exact.append(sv[:, 0])
            gap.append(sv[:, 1] / sv[:, 0])
            est.append(pair_sigma(xa, xb, iters).double())
        est, exact = torch.stack(est), torch.stack(exact)
        out[form] = ((est - exact).abs() / exact, torch.stack(gap), est, exact)
    return out


def main(args):
    header = (f"{'case':<13} {'form':<7} {'iters':>5} {'pairs':>6} {'median rel':>11} {'max rel':>10} "
              f"{'>1%':>6} {'s2/s1 med':>10} {'s2/s1 max':>10} {'loss rel':>9}")
    print(header)
    print("-" * len(header))
    for case in args.cases:
        name, size, batch, ep0 = CASES[case]
        torch.manual_seed(args.seed)
        model = create_model(name)
        if ep0:
            set_ede_schedule(model, 0, args.epochs)
        x = torch.randn(batch, 3, size, size)
        acts = record_chain(model, x)
        for iters in args.iters:
            res = measure(acts, iters)
            _, _, est_b, exact_b = res["binary"]
            _, _, est_f, exact_f = res["real"]
            loss_est = ((est_b / est_f - 1) ** 2).mean()
            loss_exact = ((exact_b / exact_f - 1) ** 2).mean()
            loss_rel = float((loss_est - loss_exact).abs() / loss_exact)
            for form in ("binary", "real"):
                rel, gap, _, _ = res[form]
                rel, gap = rel.flatten(), gap.flatten()
                print(f"{case:<13} {form:<7} {iters:>5} {rel.numel():>6} {rel.median().item():>11.2e} "
                      f"{rel.max().item():>10.2e} {(rel > 0.01).double().mean().item():>6.1%} "
                      f"{gap.median().item():>10.3f} {gap.max().item():>10.4f} {loss_rel:>9.2e}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
