"""Checkpoints: a plain dict with a versioned schema, written atomically, read with ``weights_only``.

Schema (``format_version`` 2)::

    format_version  int, 2
    model           registry name of the network
    num_classes     classifier width
    dataset         the dataset it was trained on
    state_dict      the unwrapped model's state dict (every value finite: nothing else is saved)
    epoch           number of completed epochs (the next epoch to run, 0-based)
    optimizer, scheduler           their state dicts
    extra           state of the regulariser (the official form's gamma), may be empty
    best_top1, best_top5, best_epoch   best validation accuracies so far (%) and the epoch (0-based)
                    that reached them, -1 before any
    history         one dict of metrics per completed epoch (summary.csv is rebuilt from it)
    args            the resolved command-line arguments, as a dict

Format 1 (the first release) also held ``scaler`` (always None) and ``rng`` (overwritten by the
per-epoch reseed); its weights load everywhere, but a run is resumed only from format 2.
Randomness needs no saved state: every epoch reseeds every generator from ``(--seed, epoch)``.

A write goes to a temporary file in the same folder, is flushed to disk, then renamed over the
target, so a crash or kill -9 at any moment leaves either the old or the new file, never a torn one.
"""
import numbers
import os
import shutil

import torch

import models

FORMAT_VERSION = 2
CHECKPOINT = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"

# Flags that do not change what a run computes: a resumed run may pass other values. Every other
# flag defines the run, and a resume that changes one is refused by name.
NOT_RUN_DEFINING = ("resume", "evaluate", "gpus", "type", "workers", "print_freq", "time_estimate",
                    "results_dir", "save", "data_path", "download", "channels_last", "threads",
                    "batch_size_test")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, malformed, or does not fit the run; one line."""


# --- writing --------------------------------------------------------------------------------------


def _temporary_name(path, pid):
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{pid}")


def _replace_via_temporary(path, write):
    """Call ``write(tmp_path)``, fsync it, then rename it over ``path``; the temporary never survives."""
    tmp = _temporary_name(path, os.getpid())
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path):
    """``torch.save(obj, path)`` via a temporary file and an atomic rename."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    _replace_via_temporary(path, write)


def copy_atomic(source, path):
    """Make ``path`` the same file as ``source`` atomically: a hard link where the file system has
    them (no copy), else a copy; either way through a temporary name and a rename."""
    def link_or_copy(tmp):
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    _replace_via_temporary(path, link_or_copy)


def remove_stale_temporaries(folder):
    """Delete temporary files that a killed :func:`save_atomic` left in ``folder``."""
    for name in os.listdir(folder):
        if name.startswith(".") and ".tmp" in name:
            os.remove(os.path.join(folder, name))


def non_finite_entries(state_dict):
    """Names of the floating-point tensors in ``state_dict`` that hold a NaN or an infinity."""
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


# --- reading --------------------------------------------------------------------------------------


def load_file(path, map_location="cpu"):
    """Read a checkpoint or state dict with ``weights_only=True``; clear errors for bad files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .pth.tar file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for torn or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); "
                              f"use another file (e.g. model_best.pth.tar)") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def is_training_checkpoint(obj):
    """True for this project's checkpoints (any format), False for bare state dicts."""
    return "format_version" in obj


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# key: (check, expected type in words); the weights part of the schema, then what a resume needs
_WEIGHTS_SCHEMA = {
    "model": (lambda v: isinstance(v, str), "a model name"),
    "num_classes": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "state_dict": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and torch.is_tensor(t)
                                                           for k, t in v.items()), "a dict of tensors"),
}
_RESUME_SCHEMA = {
    "epoch": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "optimizer": (lambda v: isinstance(v, dict), "a dict"),
    "scheduler": (lambda v: isinstance(v, dict), "a dict"),
    "extra": (lambda v: isinstance(v, dict), "a dict"),
    "best_top1": (_is_number, "a number"),
    "best_top5": (_is_number, "a number"),
    "best_epoch": (_is_int, "an integer"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of dicts"),
    "args": (lambda v: isinstance(v, dict), "a dict"),
    "dataset": (lambda v: isinstance(v, str), "a dataset name"),
}


def validate(obj, path, for_resume=False):
    """Check a training checkpoint's schema (the weights part, and with ``for_resume`` all of it);
    raises :class:`CheckpointError` naming the first bad key."""
    version = obj.get("format_version")
    if not _is_int(version) or not 1 <= version:
        raise CheckpointError(f"checkpoint {path} is malformed: format_version is {version!r}, not a positive "
                              f"integer; use another file")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {version}, newer than this code's "
                              f"{FORMAT_VERSION}; update the code")
    if for_resume and version < FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {version}, written by an older version of this "
                              f"code that resumes differently; evaluate or export it, or start a new run")
    schema = {**_WEIGHTS_SCHEMA, **(_RESUME_SCHEMA if for_resume else {})}
    for key, (ok, what) in schema.items():
        if key not in obj:
            raise CheckpointError(f"checkpoint {path} is malformed: it has no '{key}'; use another file")
        if not ok(obj[key]):
            raise CheckpointError(f"checkpoint {path} is malformed: '{key}' is {type(obj[key]).__name__}, "
                                  f"expected {what}; use another file")
    if for_resume and len(obj["history"]) != obj["epoch"]:
        raise CheckpointError(f"checkpoint {path} is malformed: {len(obj['history'])} history rows for "
                              f"{obj['epoch']} epochs; use another file")


def load_model_weights(model, obj, path, model_name, num_classes):
    """Load a checkpoint dict or bare state dict into ``model`` (unwrapped); strict, with clear errors.

    Refuses weights that hold a NaN or an infinity."""
    if is_training_checkpoint(obj):
        validate(obj, path)
        if obj["model"] != model_name:
            raise CheckpointError(f"checkpoint {path} is of model {obj['model']}, not {model_name}; "
                                  f"pass --model {obj['model']}")
        if obj["num_classes"] != num_classes:
            raise CheckpointError(f"checkpoint {path} has {obj['num_classes']} classes but the dataset "
                                  f"has {num_classes}; pick the dataset it was trained on")
        state = obj["state_dict"]
    else:
        state = obj
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"checkpoint {path} is not a state dict (its values are not all tensors)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"{len(missing)} missing keys (e.g. {missing[:1]}), {len(unexpected)} unexpected "
                  f"(e.g. {unexpected[:1]}), {len(wrong)} with other shapes (e.g. {wrong[:1]})")
        raise CheckpointError(f"checkpoint {path} does not fit model {model_name} with {num_classes} "
                              f"classes: {detail}; pass the --model and --dataset it was trained with")
    bad = non_finite_entries(state)
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values in {len(bad)} tensors "
                              f"(e.g. {bad[0]}); use an earlier checkpoint")
    model.load_state_dict(state, strict=True)


def read_model_meta(obj, path):
    """``{"model", "num_classes", "dataset"}`` a loaded file says about itself (None where it does not:
    a bare state dict names no model or dataset; its classes are read off ``fc.weight``)."""
    if is_training_checkpoint(obj):
        validate(obj, path)
        saved = obj.get("args")
        dataset = obj.get("dataset") or (saved.get("dataset") if isinstance(saved, dict) else None)
        return {"model": obj["model"], "num_classes": obj["num_classes"], "dataset": dataset}
    classes = obj["fc.weight"].shape[0] if torch.is_tensor(obj.get("fc.weight")) else None
    return {"model": None, "num_classes": classes, "dataset": None}


def read_model(path, model_name=None, num_classes=None):
    """Build the network stored at ``path`` and load its weights: ``(model, meta)`` in eval mode.

    A training checkpoint names its model, class count and dataset (``model_name``/``num_classes``,
    when given, must agree); a bare state dict needs ``model_name``, and ``num_classes`` or a
    classifier ``fc.weight`` to read it from. ``meta``: ``model``, ``num_classes``, ``dataset``
    (None when the file does not say).
    """
    obj = load_file(path)
    meta = read_model_meta(obj, path)
    model_name = model_name or meta["model"]
    num_classes = num_classes or meta["num_classes"]
    dataset = meta["dataset"]
    if not model_name or not num_classes:
        raise CheckpointError(f"checkpoint {path} is a bare state dict; pass --model NAME (and the number of "
                              f"classes or the dataset)")
    try:
        model = models.create_model(model_name, num_classes=int(num_classes))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    load_model_weights(model, obj, path, model_name, int(num_classes))
    model.eval()
    return model, {"model": model_name, "num_classes": int(num_classes), "dataset": dataset}


# --- resuming --------------------------------------------------------------------------------------


# Flags added after runs were already being recorded, with the value that describes a run recorded
# before them: its arguments lack the key, and it computed what that value computes.
LEGACY_VALUES = {"lcr_surrogate": "ede", "precise_bn": 0, "lcr_sigma_f": "detached"}


def saved_value(saved_args, name):
    """A recorded run's value of flag ``name``, with :data:`LEGACY_VALUES` for flags it predates."""
    return saved_args.get(name, LEGACY_VALUES.get(name))


def changed_run_flags(saved_args, args):
    """``--flag old -> new`` for every run-defining flag whose value differs from ``saved_args``."""
    current = vars(args)
    return [f"--{k} {saved_value(saved_args, k)!r} -> {v!r}" for k, v in sorted(current.items())
            if k not in NOT_RUN_DEFINING and _normalise(saved_value(saved_args, k)) != _normalise(v)]


def _normalise(value):
    """Compare values as JSON would store them: tuples as lists, -0.0 as 0.0."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and value == 0:
        return 0.0
    return value


def restore(path, obj, args, model, optimizer, scheduler, regularizer):
    """Put a validated training checkpoint ``obj`` into the run's objects.

    Returns ``(epochs done, best dict, history)``; refuses a checkpoint of another run by the flags
    that differ.
    """
    validate(obj, path, for_resume=True)
    changed = changed_run_flags(obj["args"], args)
    if changed:
        raise CheckpointError(f"{path} belongs to a run with other flags ({'; '.join(changed)}); resume with the "
                              f"flags it was started with, or start a new run with --save SUFFIX")
    load_model_weights(model, obj, path, args.model, obj["num_classes"])
    try:
        optimizer.load_state_dict(obj["optimizer"])
        scheduler.load_state_dict(obj["scheduler"])
        if regularizer is not None:
            regularizer.load_state_dict(obj["extra"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is malformed: its optimizer, scheduler or regulariser state does not fit "
                              f"({type(exc).__name__}); use another file") from None
    best = {"top1": float(obj["best_top1"]), "top5": float(obj["best_top5"]), "epoch": int(obj["best_epoch"])}
    return obj["epoch"], best, list(obj["history"])


def training_state(args, model, num_classes, epochs_done, optimizer, scheduler, regularizer, best, history):
    """The checkpoint dict of this module's schema after ``epochs_done`` epochs."""
    return {
        "format_version": FORMAT_VERSION, "model": args.model, "num_classes": num_classes,
        "dataset": args.dataset, "state_dict": model.state_dict(), "epoch": epochs_done,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "extra": regularizer.state_dict() if regularizer is not None else {},
        "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
        "history": history, "args": vars(args),
    }
