"""Meters and logging: running averages, the console and log file, tensorboard scalars."""
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


class _BelowError(logging.Filter):
    """Lets through what is not an error: errors reach the terminal once, on stderr (utils.trainer.main)."""

    def filter(self, record):
        return record.levelno < logging.ERROR


def get_logger(save_path, is_main):
    """Logger printing to stdout and appending to ``<save_path>/log.txt`` on rank 0 (no file when
    ``save_path`` is None); silent on the other ranks. Errors go to the file only: the entry point
    prints each error once, on stderr."""
    logger = logging.getLogger(f"lcr.{save_path}")
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.CRITICAL + 1)
    if is_main:
        fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
        console = logging.StreamHandler(sys.stdout)
        console.addFilter(_BelowError())
        handlers = [console]
        if save_path is not None:
            handlers.append(logging.FileHandler(os.path.join(save_path, "log.txt")))
        for handler in handlers:
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    return logger


def close_logger(logger):
    """Close the logger's files (before its run folder may be removed)."""
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()


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

    def epoch(self, row):
        """An epoch's ``summary.csv`` row as scalars; per-layer sigma ratios under ``sigma_ratio/``."""
        epoch = row["epoch"]
        self.scalars({k: v for k, v in row.items() if k != "epoch" and not k.startswith("sigma_ratio_")}, epoch)
        self.scalars({f"layer{k[len('sigma_ratio_'):]}": v for k, v in row.items()
                      if k.startswith("sigma_ratio_") and k != "sigma_ratio_mean"}, epoch, prefix="sigma_ratio/")

    def close(self):
        if self.writer is not None:
            self.writer.close()
