"""Checkpoints: a plain dict with a versioned schema, written atomically, read with ``weights_only``.

Schema (``format_version`` 1)::

    format_version  int, 1
    model           registry name of the network
    num_classes     classifier width
    state_dict      the unwrapped model's state dict
    epoch           number of completed epochs (the next epoch to run, 0-based)
    optimizer, scheduler, scaler   their state dicts (scaler is None: --amp is bfloat16, which needs no loss scaling)
    extra           state of the regulariser (e.g. the official form's gamma), may be empty
    best_top1, best_top5           best validation accuracies so far, %
    history         one dict of metrics per completed epoch (summary.csv is rebuilt from it)
    args            the resolved command-line arguments, as a dict
    rng             RNG states: torch, cuda (list), numpy, python

A write goes to a temporary file in the same folder, is flushed to disk, then renamed over the
target, so a crash or kill -9 at any moment leaves either the old or the new file, never a torn one.
"""
import os
import random

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or does not fit the model; one line."""


def save_atomic(obj, path):
    """``torch.save(obj, path)`` via a temporary file and an atomic rename."""
    tmp = _temporary_name(path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _temporary_name(path, pid):
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{pid}")


def remove_stale_temporaries(folder):
    """Delete temporary files that a killed :func:`save_atomic` left in ``folder``."""
    for name in os.listdir(folder):
        if name.startswith(".") and ".pth.tar.tmp" in name:
            os.remove(os.path.join(folder, name))


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
    """True for this project's full checkpoints, False for bare state dicts."""
    return "format_version" in obj and "state_dict" in obj


def load_model_weights(model, obj, path, model_name, num_classes):
    """Load a checkpoint dict or bare state dict into ``model`` (unwrapped); strict, with clear errors."""
    if is_training_checkpoint(obj):
        if obj["format_version"] > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path} has format {obj['format_version']}, newer than "
                                  f"this code's {FORMAT_VERSION}; update the code")
        if obj.get("model") != model_name:
            raise CheckpointError(f"checkpoint {path} is of model {obj.get('model')}, not {model_name}; "
                                  f"pass --model {obj.get('model')}")
        if obj.get("num_classes") != num_classes:
            raise CheckpointError(f"checkpoint {path} has {obj.get('num_classes')} classes but the dataset "
                                  f"has {num_classes}; pick the dataset it was trained on")
        state = obj["state_dict"]
    else:
        state = obj
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
    model.load_state_dict(state, strict=True)


def rng_state():
    """Every RNG the run uses, in types that ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state):
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
