"""Where tools write: never over a file they did not write themselves, never over one of their inputs.

Every file a tool writes carries a tag that says which tool wrote it: JSON files and ``torch.save``'d
dicts a ``"format"`` key, images a PIL metadata entry, folders a hidden marker file. Before writing,
:func:`check_output` refuses a path that is one of the tool's inputs, or that holds a file without
the tool's tag (unless the user passes ``--force``); the refusal is one line that says what to do.
"""
import json
import os

import torch

IMAGE_TAG_KEY = "Software"   # PNG text chunk / JPEG comment that holds the tag of an image


class OutputError(Exception):
    """A tool's output path cannot be used; one line."""


def has_tag(path, tag):
    """True when the file at ``path`` was written by the tool whose tag is ``tag``."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                return json.load(f).get("format") == tag
        if path.endswith((".png", ".jpg", ".jpeg")):
            from PIL import Image
            with Image.open(path) as image:
                info = image.info
                return tag in str(info.get(IMAGE_TAG_KEY, "")) or tag in str(info.get("comment", b""), "latin1")
        if os.path.isdir(path):
            return os.path.isfile(os.path.join(path, f".{tag}"))
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return isinstance(obj, dict) and obj.get("format") == tag
    except Exception:  # unreadable or foreign: not ours
        return False


def check_output(path, tag, inputs=(), force=False, flag="--out"):
    """Raise :class:`OutputError` unless ``path`` may be written by the tool tagged ``tag``."""
    target = os.path.abspath(path)
    for source in inputs:
        if source and os.path.exists(source) and os.path.exists(target) and os.path.samefile(source, target):
            raise OutputError(f"{path} is also the input {source}; pass another {flag}")
        if source and os.path.abspath(source) == target:
            raise OutputError(f"{path} is also the input {source}; pass another {flag}")
    parent = os.path.dirname(target)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise OutputError(f"cannot write {path}: {parent} is a file, not a folder; pass another {flag}")
    if os.path.isdir(target) and not (force or has_tag(target, tag) or not os.listdir(target)):
        raise OutputError(f"{path} is a folder that this tool did not make; pass another {flag}, or --force")
    if os.path.isfile(target) and not force and not has_tag(target, tag):
        raise OutputError(f"{path} exists and was not written by this tool; pass another {flag}, or --force "
                          f"to replace it")
    return target


def mark_folder(path, tag):
    """Tag the folder ``path`` (made by the tool ``tag``) so that later runs of the tool may reuse it."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f".{tag}"), "w") as f:
        f.write(tag + "\n")
