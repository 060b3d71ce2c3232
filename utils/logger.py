"""Meters and run records: running averages, the log file, tensorboard scalars and ``summary.csv``."""
import csv
import json
import logging
import os
import sys

import torch


class AverageMeter:
    """Running sum, count and average of one quantity, weighted by batch size."""

    def __init__(self, name, fmt=":.4f"):
        self.name, self.fmt = name, fmt
        self.sum, self.count, self.val = 0.0, 0, 0.0

    def update(self, val, n=1):
        self.val = float(val)
        self.sum += self.val * n
        self.count += n

    @property
    def avg(self):
        return self.sum / max(self.count, 1)

    def __str__(self):
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(
            name=self.name, val=self.val, avg=self.avg)


def accuracy_counts(logits, target, topk=(1, 5)):
    """Number of samples whose label is among the top-k logits, for each k (k capped at the classes)."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, :min(k, maxk)].any(dim=1).sum().item() for k in topk]


def get_logger(save_path, is_main):
    """Logger printing to stdout and appending to ``<save_path>/log.txt`` (rank 0; no file when
    ``save_path`` is None); warnings only elsewhere."""
    logger = logging.getLogger(f"lcr.{save_path}")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if is_main:
        fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
        handlers = [logging.StreamHandler(sys.stdout)]
        if save_path is not None:
            handlers.append(logging.FileHandler(os.path.join(save_path, "log.txt")))
        for handler in handlers:
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    return logger


def save_args(args, save_path):
    """Write the resolved arguments to ``<save_path>/args.json``."""
    with open(os.path.join(save_path, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2, sort_keys=True)


def write_summary(history, path):
    """Rewrite ``summary.csv`` from the list of per-epoch metric dicts (atomic rename)."""
    if not history:
        return
    fields = []
    for row in history:
        fields += [k for k in row if k not in fields]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


class TensorBoard:
    """Thin tensorboard writer that is a no-op off rank 0."""

    def __init__(self, save_path, enabled):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=os.path.join(save_path, "tb"))

    def scalars(self, values, step, prefix=""):
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1):
                self.writer.add_scalar(prefix + key, float(value), step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
