"""SGD and the learning-rate schedule of a run, as torch's own schedulers express them.

Per-epoch schedules (``scheduler.step()`` once after every epoch), for ``E = --epochs``:

- ``--lr_type cos``: ``lr_e = lr * (1 + cos(pi e / E)) / 2`` (``CosineAnnealingLR`` to 0);
- ``--lr_type step``: ``lr_e = lr * 0.1 ** (number of --lr_decay_step epochs <= e)`` (``MultiStepLR``);
- ``--warm_up``: the first ``W = 5`` epochs ramp linearly, ``lr_e = lr * (e + 1) / (W + 1)``
  (``LinearLR``), then the schedule above takes over (``SequentialLR``): the cosine over the
  remaining ``E - W`` epochs, the steps at the same absolute epochs.
"""
import torch
from torch.optim import lr_scheduler

WARMUP_EPOCHS = 5


def build_optimizer(params, args):
    """SGD with ``--lr``, ``--momentum`` and ``--weight_decay`` over ``params``."""
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def build_scheduler(optimizer, args):
    """The per-epoch lr schedule of the module docstring, advanced past ``--start_epoch`` epochs."""
    warmup = min(WARMUP_EPOCHS, args.epochs - 1) if args.warm_up else 0

    def main_schedule(offset):
        if args.lr_type == "step":
            return lr_scheduler.MultiStepLR(optimizer, [max(s - offset, 0) for s in args.lr_decay_step], 0.1)
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs - offset, 1), eta_min=0.0)

    if warmup:
        ramp = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
        scheduler = lr_scheduler.SequentialLR(optimizer, [ramp, main_schedule(warmup)], milestones=[warmup])
    else:
        scheduler = main_schedule(0)
    for _ in range(args.start_epoch):
        scheduler.step()
    return scheduler
