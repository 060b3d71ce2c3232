"""One training step, one training epoch and one evaluation pass; each returns a plain dict of metrics.

:func:`evaluate` is the project's only evaluation loop: the training scripts, ``-e`` and the tools
(corruption benchmarks, export checks) all call it.
"""
import contextlib
import itertools
import math
import time

import torch
import torch.nn.functional as F

from utils.distributed import all_reduce_sum
from utils.logger import AverageMeter, accuracy_counts


class NonFiniteLossError(Exception):
    """The training loss became NaN or infinite."""


def autocast(device, enabled):
    """bfloat16 autocast on CUDA when ``enabled``; a no-op context otherwise."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(images, target, device, channels_last):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device, non_blocking=True)


def train_step(model, regularizer, images, target, optimizer, weight, amp=False, check_finite=None):
    """One SGD step on ``CE + weight * lcr`` with ``lcr, logs = regularizer.loss()`` (just CE when
    ``regularizer`` is None).

    ``check_finite(value) -> message``: when given, a non-finite loss raises
    :class:`NonFiniteLossError` with that message before any parameter changes. Returns a dict of
    tensors: logits, loss, ce, lcr (None without regulariser), ratios (per-layer sigma_B/sigma_F
    of the paper form, else None) and grad_norm (the L2 norm of all parameter gradients of the step).
    """
    with autocast(images.device, amp):
        if regularizer is None:
            logits = model(images)
            ce = F.cross_entropy(logits, target)
            lcr, ratios, loss = None, None, ce
        else:
            with regularizer.record():
                logits = model(images)
            ce = F.cross_entropy(logits, target)
            lcr, logs = regularizer.loss()
            ratios = logs.get("sigma_ratio")
            loss = ce + weight * lcr
    if check_finite is not None and not math.isfinite(loss.item()):
        raise NonFiniteLossError(check_finite(loss.item()))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    optimizer.step()
    return {"logits": logits.detach(), "loss": loss.detach(), "ce": ce.detach(),
            "lcr": None if lcr is None else lcr.detach(), "ratios": ratios, "grad_norm": grad_norm}


def print_every(n_iter, print_freq):
    """Iterations between progress lines: ``print_freq``, or about five lines per epoch when it is 0."""
    return print_freq if print_freq > 0 else max(1, n_iter // 5)


def train_one_epoch(model, regularizer, loader, optimizer, runtime, epoch, args, logger):
    """Train for one epoch; ``regularizer`` is None when ``--alpha 0`` (plain IR-Net, nothing recorded).

    Returns the epoch's averages: loss, ce, lcr, lcr_share, top1, top5, grad_norm (and its maximum
    over the steps, grad_norm_max), img_s, data_time, images, and ``sigma_ratio`` (per binary layer,
    mean sigma_B / sigma_F over the epoch's batches) when the paper form is on. Progress lines show
    the running averages, the average images/s so far and the time left in the epoch.
    """
    model.train()
    meters = {name: AverageMeter(name) for name in ("loss", "ce", "lcr", "top1", "top5")}
    data_time = AverageMeter("data", ":.3f")
    weight = args.alpha * (regularizer.weight_scale if regularizer is not None else 0.0)
    ratio_sum, ratio_steps = None, 0
    grad_norm = AverageMeter("grad_norm")
    grad_norm_max = 0.0
    n_iter = len(loader)
    every = print_every(n_iter, args.print_freq)
    started = end = time.perf_counter()
    for it, batch in enumerate(loader):
        if batch is None:           # every image of the batch was unreadable (and named on stderr)
            continue
        images, target = _to_device(*batch, runtime.device, args.channels_last)
        data_time.update(time.perf_counter() - end)
        step = train_step(model, regularizer, images, target, optimizer, weight, args.amp,
                          check_finite=lambda value: f"loss is {value} at epoch {epoch} iteration {it}")
        logits, loss, ce, lcr = step["logits"], step["loss"], step["ce"], step["lcr"]
        if step["ratios"] is not None:
            ratio_sum = step["ratios"] if ratio_sum is None else ratio_sum + step["ratios"]
            ratio_steps += 1

        n = images.shape[0]
        grad_norm.update(step["grad_norm"].item(), n)
        grad_norm_max = max(grad_norm_max, grad_norm.val)
        top1, top5 = accuracy_counts(logits, target)
        meters["loss"].update(loss.item(), n)
        meters["ce"].update(ce.item(), n)
        meters["lcr"].update(0.0 if lcr is None else lcr.item(), n)
        meters["top1"].update(100.0 * top1 / n, n)
        meters["top5"].update(100.0 * top5 / n, n)
        end = time.perf_counter()
        if (it + 1) % every == 0 or it == n_iter - 1:
            elapsed = end - started
            img_s = meters["loss"].count * runtime.world_size / max(elapsed, 1e-9)
            left = elapsed / (it + 1) * (n_iter - it - 1)
            logger.info(f"Epoch [{epoch}][{it + 1}/{n_iter}] " + "  ".join(str(m) for m in meters.values())
                        + f"  {img_s:.0f} img/s  {data_time}  eta {format_seconds(left)}")
    elapsed = time.perf_counter() - started
    stats = {name: m.avg for name, m in meters.items()}
    stats["lcr_share"] = weight * stats["lcr"] / stats["loss"] if stats["loss"] > 0 else 0.0
    stats["grad_norm"], stats["grad_norm_max"] = grad_norm.avg, grad_norm_max
    stats["img_s"] = meters["loss"].count * runtime.world_size / max(elapsed, 1e-9)
    stats["data_time"] = data_time.avg
    stats["images"] = meters["loss"].count
    if ratio_sum is not None:
        stats["sigma_ratio"] = (ratio_sum / ratio_steps).tolist()
    return stats


def format_seconds(seconds):
    """``1h02m``, ``3m05s`` or ``12s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


@torch.no_grad()
def evaluate(model, batches, device, amp=False, channels_last=False, runtime=None):
    """Loss, top-1 and top-5 (%) of ``model`` over an iterable of ``(images, labels)`` batches.

    Summed over all processes when ``runtime`` is distributed (each process gives its shard), so the
    numbers cover exactly the whole set. Also returns ``count`` (images seen) and ``correct``
    (top-1 hits). Batches that are None (all images unreadable) are skipped.
    """
    model.eval()
    loss_sum, top1, top5, count = 0.0, 0, 0, 0
    for batch in batches:
        if batch is None:
            continue
        images, target = _to_device(*batch, device, channels_last)
        with autocast(device, amp):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum").item()
        c1, c5 = accuracy_counts(logits, target)
        top1, top5, count = top1 + c1, top5 + c5, count + images.shape[0]
    if runtime is not None:
        loss_sum, top1, top5, count = all_reduce_sum([loss_sum, top1, top5, count], runtime)
    total = max(count, 1)
    return {"loss": loss_sum / total, "top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total,
            "count": int(count), "correct": int(round(top1))}


@torch.no_grad()
def empirical_lipschitz(model, images, eps=0.01, trials=8, seed=0):
    """Largest ``||f(x + d) - f(x)|| / ||d||`` over ``trials`` random ``d`` per image (logits as f).

    ``d`` is a Gaussian direction scaled to ``eps * ||x||`` per image; a private generator keeps
    the training RNG streams untouched, so the estimate is the same function of the weights in
    every epoch and after a resume. Runs in eval mode and restores the previous mode.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ref = model(images).float()
    x_norm = images.flatten(1).norm(dim=1)
    best = 0.0
    for _ in range(trials):
        d = torch.randn(images.shape, generator=gen).to(images.device, images.dtype)
        d = d * (eps * x_norm / d.flatten(1).norm(dim=1)).view(-1, *[1] * (images.dim() - 1))
        ratio = (model(images + d).float() - ref).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
        best = max(best, ratio.max().item())
    model.train(was_training)
    return best


def recalibrate_batchnorm(model, loader, device, batches, amp=False, channels_last=False, runtime=None):
    """Re-estimate every BatchNorm's running mean and variance as plain averages over the first
    ``batches`` batches of ``loader`` (``--precise_bn``), in training mode without gradients, under
    the same autocast and memory format as training; under DDP the ranks' estimates are averaged.

    The running statistics that training leaves are a momentum-0.1 average dominated by the last
    few batches, taken while the weights still move; late in training, where the EDE's t makes the
    steps large, they can lag the weights that are evaluated (docs/METHOD.md section 5). Call it on
    the unwrapped model. Batches that are None (all images unreadable) are skipped.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None            # cumulative average over the batches seen
    was_training = model.training
    model.train()
    with torch.no_grad():
        for batch in itertools.islice(loader, batches):
            if batch is None:
                continue
            images, _ = _to_device(*batch, device, channels_last)
            with autocast(device, amp):
                model(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    if runtime is not None and runtime.distributed:
        for m in norms:
            for stat in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(stat)
                stat.div_(runtime.world_size)
