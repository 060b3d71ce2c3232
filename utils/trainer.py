"""The training run behind both ``main.py`` scripts, as a table of contents.

:func:`run` reads top to bottom as the recipe: pick the device, open the run folder, build data,
model and regulariser, restore a checkpoint if asked, then for each epoch set the EDE schedule,
train, evaluate, and save. Each step is a function of the module that owns it. :func:`main` wraps
it so that bad input ends with one ``error:`` line on stderr and exit status 1.
"""
import json
import os
import random
import sys
import time

import numpy as np
import torch

import models
from modules import set_ede_schedule
from utils import checkpoint as ckpt
from utils import options
from utils.data import DataError, build_datasets, build_loaders
from utils.distributed import DeviceError, cleanup, setup_runtime, sync_gradients_of, wrap_model
from utils.engine import (NonFiniteLossError, empirical_lipschitz, evaluate, format_seconds, recalibrate_batchnorm,
                          train_one_epoch)
from utils.logger import TensorBoard, get_logger
from utils.optim import build_optimizer, build_scheduler
from utils.outputs import OutputError, check_output
from utils.regularizers import RegularizerError, build_regularizer
from utils.runfolder import RunFolder, RunFolderError, atomic_text, describe_os_error, provenance

USER_ERRORS = (DataError, ckpt.CheckpointError, DeviceError, NonFiniteLossError, RegularizerError, RunFolderError,
               OutputError)


class NonFiniteModelError(Exception):
    """The weights or BatchNorm statistics became NaN or infinite; the last good checkpoint is kept."""


def epoch_seed(seed, epoch):
    """Seed of one epoch: the run's randomness is a function of (seed, epoch), so resume is exact."""
    return seed * 100_003 + epoch


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(args):
    """Train (or, with ``-e``, evaluate) as ``args`` say; returns the last metrics dict."""
    runtime = setup_runtime(args.gpus, args.threads)
    if args.evaluate:
        return evaluate_checkpoint(args, runtime)
    folder = RunFolder(os.path.join(args.results_dir, args.model + args.save), runtime.is_main)
    resume_path = folder.open(args.resume)
    with folder.logging() as logger:
        announce(args, runtime, logger)
        seed_all(args.seed)
        train_set, val_set, num_classes = build_datasets(args.dataset, args.data_path, args.download,
                                                         tuple(args.fake_size), args.fake_image_size)
        model = build_model(args, num_classes, runtime.device)
        logger.info(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters; "
                    f"{len(train_set)} training and {len(val_set)} validation images, {num_classes} classes")
        regularizer = build_regularizer(args, model, num_classes, runtime.device, logger)
        optimizer, scheduler = build_optimization(model, regularizer, args, runtime)
        progress = Progress.start(args, resume_path, model, optimizer, scheduler, regularizer, logger)
        record_start(folder, args, runtime, resume_path)
        if progress.finished(args):
            return finish_records(folder, progress, logger)
        net = wrap_model(model, runtime)
        train_loader, val_loader, generator = build_loaders(train_set, val_set, args, runtime)
        lip_images = first_images(val_set, args.lip_images, runtime.device)
        folder.track("tb")
        board = TensorBoard(folder.path, runtime.is_main)
        for epoch in range(progress.epochs_done, args.epochs):
            reseed(args.seed, epoch, generator, train_loader, runtime)
            t, _ = set_ede_schedule(model, epoch, args.epochs, args.Tmin, args.Tmax)
            lr = optimizer.param_groups[0]["lr"]
            train = train_one_epoch(net, regularizer, train_loader, optimizer, runtime, epoch, args, logger)
            if args.precise_bn:
                recalibrate_batchnorm(model, train_loader, runtime.device, args.precise_bn, args.amp,
                                      args.channels_last, runtime)
            val = evaluate(net, val_loader, runtime.device, args.amp, args.channels_last, runtime)
            scheduler.step()
            row = progress.add(epoch, lr, t, train, val, empirical_lipschitz_of(model, lip_images, args))
            save_epoch(folder, args, model, regularizer, num_classes, optimizer, scheduler, progress, row)
            board.epoch(row)
            logger.info(epoch_line(row, progress, len(val_set), args))
        board.close()
        logger.info(progress.final_line(folder.path))
        cleanup(runtime)
        return progress.result()


class Progress:
    """Where a run stands: completed epochs, their summary rows, the best epoch, the wall clock."""

    def __init__(self, epochs_done, best, history, checkpoint=None):
        self.epochs_done, self.best, self.history, self.checkpoint = epochs_done, best, history, checkpoint
        self.started = self._mark = time.time()
        self.is_best, self.last_train, self.last_val = False, None, None

    @classmethod
    def start(cls, args, resume_path, model, optimizer, scheduler, regularizer, logger):
        """A fresh run's progress (after ``--start_epoch``), or the checkpoint's, restored into the objects."""
        if not resume_path:
            return cls(args.start_epoch, {"top1": 0.0, "top5": 0.0, "epoch": -1}, [])
        obj = ckpt.load_file(resume_path)
        done, best, history = ckpt.restore(resume_path, obj, args, model, optimizer, scheduler, regularizer)
        logger.info(f"resumed from {resume_path}: {done} epochs done, best top-1 {best['top1']:.2f}")
        return cls(done, best, history, obj)

    def finished(self, args):
        return self.epochs_done >= args.epochs

    def add(self, epoch, lr, t, train, val, lipschitz):
        """Record a finished epoch; returns its ``summary.csv`` row."""
        self.is_best = val["top1"] > self.best["top1"]
        if self.is_best:
            self.best = {"top1": val["top1"], "top5": val["top5"], "epoch": epoch}
        self.last_train, self.last_val = train, val
        ratios = train.pop("sigma_ratio", [])
        row = {"epoch": epoch, "lr": lr, "ede_t": t}
        row.update({f"train_{k}": v for k, v in train.items()})
        row.update({f"val_{k}": v for k, v in val.items() if k != "correct"})
        row.update({"best_top1": self.best["top1"], "best_top5": self.best["top5"], "best_epoch": self.best["epoch"],
                    "epoch_time_s": time.time() - self._mark})
        if ratios:
            row["sigma_ratio_mean"] = sum(ratios) / len(ratios)
            row.update({f"sigma_ratio_{i}": r for i, r in enumerate(ratios)})
        if lipschitz is not None:
            row["lipschitz_emp"] = lipschitz
        self.history.append(row)
        self._mark = time.time()
        return row

    def final_line(self, path):
        last = self.history[-1]
        return (f"finished in {format_seconds(time.time() - self.started)}: best top-1 {self.best['top1']:.2f} "
                f"top-5 {self.best['top5']:.2f} at epoch {self.best['epoch']}; last top-1 {last['val_top1']:.2f}; "
                f"run folder {path}")

    def result(self):
        last = self.history[-1] if self.history else {}
        return {"best_top1": self.best["top1"], "best_top5": self.best["top5"], "best_epoch": self.best["epoch"],
                **{k.replace("val_", "last_"): v for k, v in last.items() if k.startswith("val_")}}


def announce(args, runtime, logger):
    """The first lines of a run: the device notice, device and threads, and what ``--amp`` does here."""
    if runtime.notice:
        logger.info(runtime.notice)
    logger.info(f"device {runtime.device}, {runtime.threads} CPU thread(s), {runtime.world_size} process(es)")
    logger.info("arguments: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    if args.amp and runtime.device.type != "cuda":
        logger.info("--amp: bfloat16 autocast is for GPUs; training on the CPU in fp32")


def build_model(args, num_classes, device):
    """The network of ``--model`` on ``device`` (channels-last when asked)."""
    model = models.create_model(args.model, num_classes=num_classes).to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def build_optimization(model, regularizer, args, runtime):
    """SGD over the model's and the regulariser's parameters (gradients of the latter averaged over
    DDP ranks), and the lr schedule."""
    extra = regularizer.parameters() if regularizer is not None else []
    sync_gradients_of(extra, runtime)
    optimizer = build_optimizer(list(model.parameters()) + extra, args)
    return optimizer, build_scheduler(optimizer, args)


def reseed(seed, epoch, generator, train_loader, runtime):
    """Every generator of the epoch from ``(seed, epoch)``: an interrupted run resumes exactly."""
    seed_all(epoch_seed(seed, epoch))
    generator.manual_seed(epoch_seed(seed, epoch))
    if runtime.distributed and hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
        train_loader.sampler.set_epoch(epoch)


def empirical_lipschitz_of(model, images, args):
    """The per-epoch empirical Lipschitz estimate, or None when ``--lip_images 0``."""
    return None if images is None else empirical_lipschitz(model, images, args.lip_eps)


def record_start(folder, args, runtime, resume_path):
    """Once every check has passed: ``args.json`` on a fresh start, a provenance record always."""
    if not resume_path or folder.started_empty:
        folder.write_args(args)
    folder.add_provenance(provenance(runtime, runtime.threads, resume_path or None))


def finish_records(folder, progress, logger):
    """A resume of a finished run: rewrite its summary, make its best file match, say it is done."""
    folder.write_summary(progress.history)
    folder.complete_best(progress.checkpoint)
    logger.info(f"run already finished ({len(progress.history)} epochs): best top-1 {progress.best['top1']:.2f} "
                f"at epoch {progress.best['epoch']}; records completed in {folder.path}")
    return progress.result()


def first_images(dataset, count, device):
    """The first ``count`` images of ``dataset`` as one batch on ``device`` (None when ``count`` is 0)."""
    if not count:
        return None
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))]).to(device)


def save_epoch(folder, args, model, regularizer, num_classes, optimizer, scheduler, progress, row):
    """Checkpoint the epoch (and its best file), then the summary; never a non-finite model."""
    history = progress.history
    state = ckpt.training_state(args, model, num_classes, len(history), optimizer, scheduler, regularizer,
                                progress.best, history)
    bad = ckpt.non_finite_entries({**state["state_dict"], **state["extra"]})
    if bad:
        kept = f"epoch {len(history) - 2}" if len(history) > 1 else "none yet"
        raise NonFiniteModelError(f"after epoch {len(history) - 1} the weights or BatchNorm statistics are not finite "
                                  f"({len(bad)} tensors, e.g. {bad[0]}); nothing saved, the last good checkpoint "
                                  f"({kept}) is kept; lower --lr or --alpha")
    folder.save(state, progress.is_best)
    folder.write_summary(history)


def epoch_line(row, progress, n_val, args):
    """The log line after an epoch; says when validation images were skipped as unreadable."""
    epoch, train, val, best = row["epoch"], progress.last_train, progress.last_val, progress.best
    line = (f"Epoch {epoch} done: train loss {train['loss']:.4f} (CE {train['ce']:.4f}, LCR {train['lcr']:.4f}, "
            f"share {100 * train['lcr_share']:.1f} %) top-1 {train['top1']:.2f} | val top-1 {val['top1']:.2f} "
            f"top-5 {val['top5']:.2f} | best {best['top1']:.2f} (epoch {best['epoch']}) | {train['img_s']:.0f} img/s")
    if val["count"] < n_val:
        line += f" | WARNING: {n_val - val['count']} of {n_val} validation images unreadable, not counted"
    if args.time_estimate:
        per_epoch = (time.time() - progress.started) / (epoch + 1 - progress.epochs_done)
        finish = time.localtime(time.time() + per_epoch * (args.epochs - epoch - 1))
        line += f" | finish at {time.strftime('%Y-%m-%d %H:%M', finish)}"
    return line


EVAL_TAG = "lcr-bnn-eval"


def evaluation_path(checkpoint, dataset):
    """``<folder>/<name>_eval_<dataset>.json`` for ``<folder>/<name>.pth.tar`` (or ``.pth``, ``.pt``)."""
    stem = checkpoint
    for suffix in (".tar", ".pth", ".pt"):
        stem = stem[:-len(suffix)] if stem.endswith(suffix) else stem
    return f"{stem}_eval_{dataset}.json"


def evaluate_checkpoint(args, runtime):
    """``-e FILE``: top-1/top-5 of a checkpoint or bare state dict on the whole validation set.

    The model and dataset are the checkpoint's unless ``-a``/``--dataset`` say otherwise; the result
    is printed and written to ``<FILE stem>_eval_<dataset>.json`` beside the checkpoint.
    """
    logger = get_logger(None, runtime.is_main)
    if runtime.notice:
        logger.info(runtime.notice)
    obj = ckpt.load_file(args.evaluate)
    meta = ckpt.read_model_meta(obj, args.evaluate)
    model_name = args.model or meta["model"]
    if not model_name:
        raise ckpt.CheckpointError(f"{args.evaluate} is a bare state dict that does not say which network it holds; "
                                   f"pass --model NAME (and --dataset NAME)")
    # the data flags the user did not give: the checkpoint's (for its own dataset), else the script's
    saved = {}
    if ckpt.is_training_checkpoint(obj) and args.dataset in (None, meta["dataset"]):
        saved = {k: v for k, v in dict(obj.get("args") or {}, dataset=meta["dataset"]).items() if v is not None}
    options.fill_data_flags(args, saved, options.family_defaults(args.family))
    dataset = args.dataset
    _, val_set, num_classes = build_datasets(dataset, args.data_path, args.download, tuple(args.fake_size),
                                             args.fake_image_size)
    model = models.create_model(model_name, num_classes=num_classes)
    ckpt.load_model_weights(model, obj, args.evaluate, model_name, num_classes)
    model.to(runtime.device)
    args.dataset, args.batch_size = dataset, max(args.batch_size_test, 2)
    _, val_loader, _ = build_loaders(val_set, val_set, args, runtime)
    result = evaluate(wrap_model(model, runtime), val_loader, runtime.device, args.amp, args.channels_last, runtime)
    logger.info(f"evaluate {args.evaluate} ({model_name} on {dataset}): top-1 {result['top1']:.2f}  "
                f"top-5 {result['top5']:.2f}  loss {result['loss']:.4f}  over {result['count']} images")
    result.update({"format": EVAL_TAG, "checkpoint": os.path.abspath(args.evaluate), "model": model_name,
                   "dataset": dataset})
    if runtime.is_main:
        out = evaluation_path(args.evaluate, dataset)
        try:
            check_output(out, EVAL_TAG, inputs=[args.evaluate], flag="-e")
            atomic_text(out, json.dumps(result, indent=2) + "\n")
        except OSError as exc:
            raise RunFolderError(describe_os_error(exc, out)) from None
        logger.info(f"saved {out}")
    cleanup(runtime)
    return result


def main(args):
    """Entry point of both scripts: run, and turn user errors into one line (rank 0) and exit status 1."""
    try:
        return run(args)
    except USER_ERRORS + (NonFiniteModelError,) as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        sys.exit(1)
