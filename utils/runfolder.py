"""The run folder ``<results_dir>/<model><save>/``: one live run, nothing of an earlier run overwritten.

What it holds::

    args.json         the resolved arguments of the run, written once, before the first epoch
    provenance.json   one record per start or resume: command line, git commit and whether the tree
                      was dirty, Python/torch/torchvision versions, device, threads, world size, time
    log.txt           everything the run printed
    summary.csv       one row per completed epoch (rebuilt from the checkpoint's history)
    tb/               tensorboard scalars
    checkpoint.pth.tar, model_best.pth.tar   the last epoch and the best one (utils/checkpoint.py)
    .lock             held (fcntl) while a run writes here; the kernel releases it when the run dies

The rules (README, "What is guaranteed"): a fresh run starts only in a folder that holds no result of
an earlier run (no checkpoint, best model or summary); a second run into a folder that a live run
holds stops at once; a resume continues the folder's own run only; a run that fails before its first
epoch leaves nothing behind; every file is replaced atomically (temporary file, then rename).
"""
import contextlib
import csv
import datetime
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys

import torch

from utils import checkpoint as ckpt

RESULT_FILES = (ckpt.CHECKPOINT, ckpt.BEST, "summary.csv")
ARGS, PROVENANCE, LOG, SUMMARY, BOARD, LOCK = "args.json", "provenance.json", "log.txt", "summary.csv", "tb", ".lock"


class RunFolderError(Exception):
    """The run folder cannot be used (taken, holds another run, unwritable); one line."""


def describe_os_error(exc, path):
    """One line for an OSError on ``path``: what failed and what to do."""
    reason = exc.strerror or type(exc).__name__
    return f"cannot write {path} ({reason}); free disk space, fix the permissions or pass --results_dir elsewhere"


def atomic_text(path, text):
    """Write ``text`` to ``path`` through a temporary file and a rename (never a torn file)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    ckpt._replace_via_temporary(path, write)


def git_state():
    """``(commit, dirty)`` of the repository holding this code, or ``(None, None)`` outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (commit or None), (bool(status) if commit else None)


def provenance(runtime, threads, resumed_from):
    """The record of one start or resume of a run (see the module docstring)."""
    import torchvision
    commit, dirty = git_state()
    device = str(runtime.device)
    if runtime.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(runtime.device)})"
    return {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv], "cwd": os.getcwd(),
        "git_commit": commit, "git_dirty": dirty,
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "device": device, "gpus": runtime.gpus, "threads": threads, "world_size": runtime.world_size,
        "host": platform.node(), "resumed_from": resumed_from,
    }


def has_results(path):
    """True when the folder holds any result of a run: a checkpoint, a best model or a summary."""
    return any(os.path.exists(os.path.join(path, name)) for name in RESULT_FILES)


class RunFolder:
    """The run folder of one process; only rank 0 (``is_main``) touches the disk."""

    def __init__(self, path, is_main):
        self.path, self.is_main = path, is_main
        self._lock = None
        self._created = []          # what this run wrote before its first checkpoint
        self.started_empty = False

    def file(self, name):
        return os.path.join(self.path, name)

    def open(self, resume):
        """Create (if needed) and lock the folder; check it fits a fresh run or a resume.

        ``resume``: '' for a fresh run, 'auto' to continue this folder's checkpoint, or a FILE
        from which this folder starts. Returns the checkpoint path to resume from, or ''.
        """
        own = self.file(ckpt.CHECKPOINT)
        if not self.is_main:
            return own if resume == "auto" else resume
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunFolderError(f"{self.path} is a file, not a run folder; move it or pass --save SUFFIX")
        existed = os.path.isdir(self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
            self._take_lock()
            ckpt.remove_stale_temporaries(self.path)
        except OSError as exc:
            raise RunFolderError(describe_os_error(exc, self.path)) from None
        self.started_empty = not has_results(self.path)
        if not existed:
            self._created.append(self.path)
        if not resume:
            if not self.started_empty:
                raise RunFolderError(f"{self.path} holds an earlier run's results; pass --resume to continue it "
                                     f"or --save SUFFIX to start a new run")
            return ""
        if resume == "auto":
            if not os.path.isfile(own):
                hint = (" (it holds only model_best.pth.tar: evaluate or export that one, or pass --save SUFFIX)"
                        if os.path.isfile(self.file(ckpt.BEST)) else "")
                raise RunFolderError(f"nothing to resume: {own} does not exist{hint}; drop --resume to start "
                                     f"a new run")
            return own
        if not os.path.isfile(resume):
            raise RunFolderError(f"nothing to resume: {resume} does not exist; pass an existing checkpoint")
        if os.path.abspath(os.path.dirname(resume)) != os.path.abspath(self.path) and not self.started_empty:
            raise RunFolderError(f"{self.path} holds another run; to continue {resume} there pass the --save of "
                                 f"its own run folder, or pass a new --save SUFFIX")
        return resume

    def _take_lock(self):
        fd = os.open(self.file(LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"{self.path} is in use by a live run (pid {holder}); wait for it to end or "
                                 f"pass --save SUFFIX") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd

    def _write(self, name, write):
        if not self.is_main:
            return
        path = self.file(name)
        new = not os.path.exists(path)
        try:
            write(path)
        except OSError as exc:
            raise RunFolderError(describe_os_error(exc, path)) from None
        if new:
            self._created.append(path)

    def write_args(self, args):
        """``args.json`` (atomic). A resume leaves the first start's file as it is."""
        self._write(ARGS, lambda p: atomic_text(p, json.dumps(vars(args), indent=2, sort_keys=True) + "\n"))

    def add_provenance(self, record):
        """Append ``record`` to ``provenance.json`` (atomic)."""
        def write(path):
            records = []
            if os.path.exists(path):
                try:
                    with open(path) as f:
                        records = json.load(f)
                except ValueError:
                    records = []
            atomic_text(path, json.dumps(records + [record], indent=2) + "\n")
        self._write(PROVENANCE, write)

    def write_summary(self, history):
        """Rewrite ``summary.csv`` from the per-epoch metric dicts (atomic)."""
        if not history:
            return
        fields = []
        for row in history:
            fields += [k for k in row if k not in fields]

        def write(path):
            def rows(tmp):
                with open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(history)
            ckpt._replace_via_temporary(path, rows)
        self._write(SUMMARY, write)

    def save(self, state, is_best):
        """Write ``checkpoint.pth.tar``, then make ``model_best.pth.tar`` the same file when ``is_best``.

        One serialisation per epoch. A kill between the two leaves a checkpoint whose best epoch is
        its own while the best file is older; :meth:`complete_best` mends that on resume.
        """
        self._write(ckpt.CHECKPOINT, lambda p: ckpt.save_atomic(state, p))
        if is_best:
            self._write(ckpt.BEST, lambda p: ckpt.copy_atomic(self.file(ckpt.CHECKPOINT), p))
        self._created.clear()      # from now on the folder holds a result: nothing is cleaned up

    def complete_best(self, state):
        """Make ``model_best.pth.tar`` match the best epoch recorded in the checkpoint ``state``."""
        if not self.is_main or state["best_epoch"] != state["epoch"] - 1:
            return
        best = self.file(ckpt.BEST)
        if os.path.isfile(best):
            try:
                if ckpt.load_file(best).get("epoch") == state["epoch"]:
                    return
            except ckpt.CheckpointError:
                pass
        self._write(ckpt.BEST, lambda p: ckpt.copy_atomic(self.file(ckpt.CHECKPOINT), p))

    def discard_if_empty(self):
        """After a failure before the first epoch of a run that started in an empty folder: remove what
        this run wrote, so no tool lists it. Files that were there before are never touched."""
        if not self.is_main or not self.started_empty:
            return
        for path in reversed(self._created):
            try:
                if path == self.path:
                    _remove(self.file(LOCK))
                    os.rmdir(path)          # only when nothing else is left in it
                else:
                    _remove(path)
            except OSError:
                pass                        # not ours to force: whatever else is there stays
        self._created.clear()

    @contextlib.contextmanager
    def logging(self):
        """The run's logger (console and ``log.txt`` on rank 0). An exception that leaves the block is
        written to ``log.txt`` (the entry point prints it once on stderr); if no epoch was saved, what
        this run wrote is removed (:meth:`discard_if_empty`)."""
        from utils.logger import close_logger, get_logger
        self.track(LOG)
        logger = get_logger(self.path if self.is_main else None, self.is_main)
        try:
            yield logger
        except Exception as exc:
            logger.error("error: " + " ".join(str(exc).split()))
            close_logger(logger)
            self.discard_if_empty()
            raise
        except BaseException:
            close_logger(logger)
            raise
        close_logger(logger)

    def track(self, name):
        """Before this run creates ``name`` in the folder (log, tensorboard): remember it for
        :meth:`discard_if_empty` if it is new."""
        path = self.file(name)
        if self.is_main and not os.path.exists(path) and path not in self._created:
            self._created.append(path)


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)
