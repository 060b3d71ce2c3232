"""The training run behind both ``main.py`` scripts: set-up, epochs, checkpoints, evaluation.

``run(args)`` reads like the recipe: pick the device(s), build data and model, restore a
checkpoint if asked, then for each epoch set the EDE schedule, train, evaluate, checkpoint.
``main(args)`` wraps it so bad input ends with one ``error:`` line and exit status 1.
"""
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

import models
from modules import set_ede_schedule
from modules.lcr import LipschitzRegularizer
from modules.lcr_official import OfficialLCR
from utils import checkpoint as ckpt
from utils.data import DataError, build_datasets, dataset_info
from utils.device_data import DeviceLoader
from utils.distributed import DeviceError, cleanup, setup_runtime, sync_gradients_of
from utils.engine import NonFiniteLossError, empirical_lipschitz, evaluate, train_one_epoch
from utils.logger import TensorBoard, get_logger, save_args, write_summary

WARMUP_EPOCHS = 5
# flags that define the lr and EDE schedules and the optimizer: a resumed run must keep them (the
# restored scheduler and optimizer states would silently override new values)
SCHEDULE_FLAGS = ("epochs", "lr", "lr_type", "lr_decay_step", "warm_up", "Tmin", "Tmax", "momentum",
                  "weight_decay")
USER_ERRORS = (DataError, ckpt.CheckpointError, DeviceError, NonFiniteLossError)


class ShardSampler(Sampler):
    """Every ``world_size``-th index from ``rank``, no padding: shards cover the set exactly once."""

    def __init__(self, length, rank, world_size):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class LRFactor:
    """Learning-rate multiplier per epoch: cosine to 0 (optionally after a linear warm-up) or steps."""

    def __init__(self, epochs, lr_type="cos", decay_steps=(), warm_up=False):
        self.epochs, self.lr_type, self.decay_steps = epochs, lr_type, list(decay_steps)
        self.warmup = min(WARMUP_EPOCHS, epochs - 1) if warm_up else 0

    def __call__(self, epoch):
        if epoch < self.warmup:
            return (epoch + 1) / (self.warmup + 1)
        if self.lr_type == "step":
            return 0.1 ** sum(epoch >= s for s in self.decay_steps)
        span = max(self.epochs - self.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - self.warmup) / span))


def epoch_seed(seed, epoch):
    """Seed of one epoch: the run's randomness is a function of (seed, epoch), so resume is exact."""
    return seed * 100_003 + epoch


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loaders(train_set, val_set, args, runtime):
    """Training and validation loaders; DDP shards both, the validation shards without padding.

    Returns ``(train, val, generator)``; the training loop reseeds ``generator`` every epoch.
    """
    per_rank = max(args.batch_size // runtime.world_size, 1)
    per_rank_test = max(args.batch_size_test // runtime.world_size, 1)
    pin = runtime.device.type == "cuda"
    generator = torch.Generator()
    # a last batch of one sample would break BatchNorm1d's batch statistics
    drop_last = len(train_set) // runtime.world_size % per_rank == 1
    if args.gpu_data:
        if not hasattr(train_set, "images") or args.dataset not in ("cifar10", "cifar100"):
            raise DataError(f"--gpu_data works with cifar10/cifar100, not {args.dataset}; drop --gpu_data")
        info = dataset_info(args.dataset)
        shard = dict(rank=runtime.rank, world_size=runtime.world_size)
        train = DeviceLoader(train_set.images, train_set.labels, per_rank, info["mean"], info["std"],
                             runtime.device, True, generator, drop_last=drop_last, **shard)
        val = DeviceLoader(val_set.images, val_set.labels, per_rank_test, info["mean"], info["std"],
                           runtime.device, False, **shard)
        return train, val, generator
    if runtime.distributed:
        train_sampler = DistributedSampler(train_set, runtime.world_size, runtime.rank, shuffle=True,
                                           seed=args.seed)
    else:
        train_sampler = None
    train = DataLoader(train_set, per_rank, shuffle=train_sampler is None, sampler=train_sampler,
                       num_workers=args.workers, pin_memory=pin, drop_last=drop_last, generator=generator)
    val = DataLoader(val_set, per_rank_test, shuffle=False, num_workers=args.workers, pin_memory=pin,
                     sampler=ShardSampler(len(val_set), runtime.rank, runtime.world_size))
    return train, val, generator


def load_fp_network(args, num_classes, device, logger):
    """The frozen full-precision network of the official LCR form, with ``--fp_weights``/``--fp_pretrained``."""
    state, source = None, ""
    if args.fp_weights:
        state = ckpt.load_file(args.fp_weights)
        if ckpt.is_training_checkpoint(state):
            num_classes = state["num_classes"]
        else:
            num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else num_classes
        source = args.fp_weights
    elif args.fp_pretrained:
        state, num_classes, source = torchvision_weights(args.model_fp), 1000, "torchvision ImageNet weights"
    fp_model = models.create_model(args.model_fp, num_classes=num_classes)
    if state is None:
        logger.warning(f"WARNING: the official LCR form compares with a RANDOM {args.model_fp}; "
                       f"pass --fp_weights FILE or --fp_pretrained for a trained one")
    else:
        ckpt.load_model_weights(fp_model, state, source, args.model_fp, num_classes)
        logger.info(f"official LCR: frozen {args.model_fp} loaded from {source}")
    return fp_model.to(device)


def torchvision_weights(name):
    """torchvision's ImageNet state dict for ``resnet18_fp``/``resnet34_fp`` (downloads: needs a network)."""
    import torchvision
    builders = {"resnet18_fp": ("resnet18", "ResNet18_Weights"), "resnet34_fp": ("resnet34", "ResNet34_Weights")}
    if name not in builders:
        raise ckpt.CheckpointError(f"--fp_pretrained has torchvision weights only for {', '.join(builders)}; "
                                   f"pass --fp_weights FILE for {name}")
    arch, weights = builders[name]
    try:
        return getattr(torchvision.models, weights).IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as exc:  # no network, proxy, or a torn download
        raise ckpt.CheckpointError(f"could not download torchvision's {arch} weights ({type(exc).__name__}); "
                                   f"download them elsewhere and pass --fp_weights FILE") from None


def build_regularizer(args, model, num_classes, device, logger):
    """The LCR loss object for ``--lcr_variant``, or None when ``--alpha 0`` (plain IR-Net)."""
    if args.alpha == 0:
        return None
    if args.lcr_variant == "paper":
        return LipschitzRegularizer(model, variant="paper", iters=args.lcr_iters)
    fp_model = load_fp_network(args, num_classes, device, logger)
    if args.channels_last:
        fp_model = fp_model.to(memory_format=torch.channels_last)
    return OfficialLCR(model, fp_model, args.batch_size)


def wrap_model(model, runtime):
    """DDP under torchrun, DataParallel over several --gpus, the bare model otherwise."""
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if len(runtime.gpus) > 1:
        return nn.DataParallel(model, device_ids=runtime.gpus)
    return model


def resolve_resume(args, save_path):
    """Path of the checkpoint to resume from, or '' for a fresh run; refuses to clobber a run."""
    own = os.path.join(save_path, "checkpoint.pth.tar")
    if not args.resume:
        if os.path.exists(own):
            raise ckpt.CheckpointError(f"{save_path} already holds a run; pass --resume to continue it "
                                       f"or --save SUFFIX to start a new one")
        return ""
    path = own if args.resume == "auto" else args.resume
    if not os.path.isfile(path):
        raise ckpt.CheckpointError(f"nothing to resume: {path} does not exist; drop --resume to start a new run")
    return path


def evaluate_checkpoint(args, runtime, logger):
    """``-e FILE``: load a checkpoint or bare state dict and report top-1/top-5 on the whole val set."""
    _, val_set, num_classes = build_datasets(args.dataset, args.data_path, args.download,
                                             tuple(args.fake_size), args.fake_image_size)
    model = models.create_model(args.model, num_classes=num_classes)
    ckpt.load_model_weights(model, ckpt.load_file(args.evaluate), args.evaluate, args.model, num_classes)
    model.to(runtime.device)
    _, val_loader, _ = build_loaders(val_set, val_set, args, runtime)
    result = evaluate(wrap_model(model, runtime), val_loader, runtime, args)
    logger.info(f"evaluate {args.evaluate}: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
                f"loss {result['loss']:.4f}  over {result['count']} images")
    return result


def resume(path, args, model, num_classes, optimizer, scheduler, regularizer):
    """Restore a training checkpoint into the run's objects; returns (next epoch, best, history)."""
    state = ckpt.load_file(path)
    ckpt.load_model_weights(model, state, path, args.model, num_classes)
    if not ckpt.is_training_checkpoint(state):
        raise ckpt.CheckpointError(f"{path} is a bare state dict; --resume needs a training checkpoint")
    changed = [f"--{k} {state['args'].get(k)} -> {getattr(args, k)}" for k in SCHEDULE_FLAGS
               if state["args"].get(k) != getattr(args, k)]
    if changed:
        raise ckpt.CheckpointError(f"{path} was trained with other schedule/optimizer flags "
                                   f"({', '.join(changed)}); resume with the flags it was started with")
    try:
        optimizer.load_state_dict(state["optimizer"])
        if regularizer and state["extra"]:
            regularizer.load_state_dict(state["extra"])
    except (ValueError, KeyError) as exc:
        raise ckpt.CheckpointError(f"{path} was trained with another --alpha/--lcr_variant "
                                   f"({exc}); resume with the flags it was started with") from None
    scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
    return state["epoch"], {"top1": state["best_top1"], "top5": state["best_top5"]}, list(state["history"])


def checkpoint_state(args, model, num_classes, epochs_done, optimizer, scheduler, regularizer, best, history):
    """The checkpoint dict of ``utils/checkpoint.py``'s schema after ``epochs_done`` epochs."""
    return {
        "format_version": ckpt.FORMAT_VERSION, "model": args.model, "num_classes": num_classes,
        "state_dict": model.state_dict(), "epoch": epochs_done, "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": None,
        "extra": regularizer.state_dict() if regularizer else {},
        "best_top1": best["top1"], "best_top5": best["top5"], "history": history,
        "args": vars(args), "rng": ckpt.rng_state(),
    }


def run(args):
    """Train (or, with ``-e``, evaluate) as ``args`` say; returns the last metrics dict."""
    runtime = setup_runtime(args.gpus)
    if args.evaluate:
        logger = get_logger(None, runtime.is_main)
        if runtime.notice:
            logger.info(runtime.notice)
        return evaluate_checkpoint(args, runtime, logger)
    save_path = os.path.join(args.results_dir, args.model + args.save)
    resume_path = resolve_resume(args, save_path)
    if runtime.is_main:
        os.makedirs(save_path, exist_ok=True)
        ckpt.remove_stale_temporaries(save_path)
    logger = get_logger(save_path, runtime.is_main)
    try:
        return _train(args, runtime, save_path, resume_path, logger)
    except USER_ERRORS as exc:
        logger.error(f"error: {exc}")
        raise


def _train(args, runtime, save_path, resume_path, logger):
    """The training part of :func:`run`, with the run folder and logger in place."""
    if runtime.notice:
        logger.info(runtime.notice)
    if args.amp and runtime.device.type != "cuda":
        logger.info("--amp: bfloat16 autocast is for GPUs; training on the CPU in fp32")
    if runtime.is_main:
        save_args(args, save_path)
    logger.info("arguments: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))

    seed_all(args.seed)
    train_set, val_set, num_classes = build_datasets(args.dataset, args.data_path, args.download,
                                                     tuple(args.fake_size), args.fake_image_size)
    model = models.create_model(args.model, num_classes=num_classes).to(runtime.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    try:
        regularizer = build_regularizer(args, model, num_classes, runtime.device, logger)
    except ValueError as exc:
        raise ckpt.CheckpointError(f"--lcr_variant {args.lcr_variant} does not fit --model {args.model}: {exc}") from None
    reg_params = regularizer.parameters() if regularizer else []
    sync_gradients_of(reg_params, runtime)
    params = list(model.parameters()) + reg_params
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRFactor(args.epochs, args.lr_type, args.lr_decay_step, args.warm_up))
    for _ in range(args.start_epoch):
        scheduler.step()
    start_epoch, best, history = args.start_epoch, {"top1": 0.0, "top5": 0.0}, []
    if resume_path:
        start_epoch, best, history = resume(resume_path, args, model, num_classes, optimizer, scheduler,
                                            regularizer)
        logger.info(f"resumed from {resume_path}: {start_epoch} epochs done, best top-1 {best['top1']:.2f}")
    logger.info(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters, "
                f"{len(train_set)} training and {len(val_set)} validation images, {num_classes} classes, "
                f"device {runtime.device}" + (f" x{runtime.world_size} processes" if runtime.distributed else ""))

    net = wrap_model(model, runtime)
    train_loader, val_loader, generator = build_loaders(train_set, val_set, args, runtime)
    lip_images = None
    if args.lip_images:
        count = min(args.lip_images, len(val_set))
        lip_images = torch.stack([val_set[i][0] for i in range(count)]).to(runtime.device)
    board = TensorBoard(save_path, runtime.is_main)
    summary_path = os.path.join(save_path, "summary.csv")
    started = time.time()
    val = {}
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        seed_all(epoch_seed(args.seed, epoch))
        generator.manual_seed(epoch_seed(args.seed, epoch))
        if runtime.distributed and not args.gpu_data:
            train_loader.sampler.set_epoch(epoch)
        t, _ = set_ede_schedule(model, epoch, args.epochs, args.Tmin, args.Tmax)
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(net, regularizer, train_loader, optimizer, runtime, epoch, args, logger)
        val = evaluate(net, val_loader, runtime, args)
        scheduler.step()
        is_best = val["top1"] > best["top1"]
        if is_best:
            best = {"top1": val["top1"], "top5": val["top5"]}
        ratios = train.pop("sigma_ratio", [])
        row = {"epoch": epoch, "lr": lr, "ede_t": t}
        row.update({f"train_{k}": v for k, v in train.items()})
        row.update({f"val_{k}": v for k, v in val.items() if k != "count"})
        row.update({"best_top1": best["top1"], "best_top5": best["top5"], "epoch_time_s": time.time() - epoch_start})
        if ratios:
            row["sigma_ratio_mean"] = sum(ratios) / len(ratios)
            row.update({f"sigma_ratio_{i}": r for i, r in enumerate(ratios)})
        if lip_images is not None:
            row["lipschitz_emp"] = empirical_lipschitz(model, lip_images, args.lip_eps)
        history.append(row)
        if runtime.is_main:
            state = checkpoint_state(args, model, num_classes, epoch + 1, optimizer, scheduler, regularizer,
                                     best, history)
            # best first: a kill between the two writes must not leave a best_top1 without its weights
            if is_best:
                ckpt.save_atomic(state, os.path.join(save_path, "model_best.pth.tar"))
            ckpt.save_atomic(state, os.path.join(save_path, "checkpoint.pth.tar"))
            write_summary(history, summary_path)
            board.scalars({k: v for k, v in row.items() if k != "epoch" and not k.startswith("sigma_ratio_")}, epoch)
            board.scalars({f"layer{i}": r for i, r in enumerate(ratios)}, epoch, prefix="sigma_ratio/")
        line = (f"Epoch {epoch} done: train loss {train['loss']:.4f} (CE {train['ce']:.4f}, LCR {train['lcr']:.4f}, "
                f"share {100 * train['lcr_share']:.1f} %) top-1 {train['top1']:.2f} | val top-1 {val['top1']:.2f} "
                f"top-5 {val['top5']:.2f} | best {best['top1']:.2f} | {train['img_s']:.0f} img/s")
        if args.time_estimate:
            per_epoch = (time.time() - started) / (epoch + 1 - start_epoch)
            finish = time.localtime(time.time() + per_epoch * (args.epochs - epoch - 1))
            line += f" | finish at {time.strftime('%Y-%m-%d %H:%M', finish)}"
        logger.info(line)
    board.close()
    logger.info(f"finished: best top-1 {best['top1']:.2f} top-5 {best['top5']:.2f}; "
                f"last top-1 {val.get('top1', float('nan')):.2f}; run folder {save_path}")
    cleanup(runtime)
    return {"best_top1": best["top1"], "best_top5": best["top5"], **{f"last_{k}": v for k, v in val.items()}}


def main(args):
    """Entry point of both scripts: run, and turn user errors into one line and exit status 1."""
    try:
        return run(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
