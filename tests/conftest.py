"""pytest configuration: make the repository root importable (``import models``, ``import modules``)."""
import csv
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


# --- writers for the real on-disk dataset formats --------------------------------------------------
# Shared by the data tests and the end-to-end runs of the training scripts.

_CIFAR_ROW_BYTES = 3 * 32 * 32  # one image: 1024 red, then green, then blue bytes


def dump_pickle(path, obj):
    """Pickle ``obj`` to ``path`` with protocol 2, the one the official (Python 2) CIFAR files use."""
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def _key(name, bytes_keys):
    return name.encode("latin1") if bytes_keys else name


def _cifar_batch(rng, n_images, label_key, num_classes, bytes_keys, batch_label):
    data = rng.integers(0, 256, size=(n_images, _CIFAR_ROW_BYTES), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, size=n_images)]
    filenames = [f"image_{i}.png".encode() for i in range(n_images)]
    entry = {
        _key("batch_label", bytes_keys): batch_label.encode(),
        _key(label_key, bytes_keys): labels,
        _key("data", bytes_keys): data,
        _key("filenames", bytes_keys): filenames,
    }
    return entry, data, labels


def write_cifar10(root, n_per_batch=3, n_test=5, bytes_keys=True):
    """Write cifar-10-batches-py/ under root; return (train data, train labels, test data, test labels)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(10)
    train_data, train_labels = [], []
    for i in range(1, 6):
        entry, data, labels = _cifar_batch(rng, n_per_batch, "labels", 10, bytes_keys,
                                           f"training batch {i} of 5")
        dump_pickle(folder / f"data_batch_{i}", entry)
        train_data.append(data)
        train_labels += labels
    entry, test_data, test_labels = _cifar_batch(rng, n_test, "labels", 10, bytes_keys, "testing batch 1 of 1")
    dump_pickle(folder / "test_batch", entry)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump_pickle(folder / "batches.meta", {
        _key("label_names", bytes_keys): [_key(n, bytes_keys) for n in names],
        _key("num_cases_per_batch", bytes_keys): n_per_batch,
        _key("num_vis", bytes_keys): _CIFAR_ROW_BYTES,
    })
    return np.concatenate(train_data), train_labels, test_data, test_labels


def write_cifar100(root, n_train=7, n_test=4, bytes_keys=False):
    """Write cifar-100-python/ under root; return (train labels, test labels)."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(100)
    result = []
    for split, n_images in (("train", n_train), ("test", n_test)):
        entry, _, labels = _cifar_batch(rng, n_images, "fine_labels", 100, bytes_keys, split)
        entry[_key("coarse_labels", bytes_keys)] = [label // 5 for label in labels]
        if split == "train":
            # Make sure the extreme fine labels round-trip.
            labels[0], labels[-1] = 0, 99
            entry[_key("fine_labels", bytes_keys)] = labels
        dump_pickle(folder / split, entry)
        result.append(labels)
    dump_pickle(folder / "meta", {
        _key("fine_label_names", bytes_keys): [f"fine_{i}" for i in range(100)],
        _key("coarse_label_names", bytes_keys): [f"coarse_{i}" for i in range(20)],
    })
    return tuple(result)


def write_image_folder(root, classes_per_split, images_per_class=3, size_wh=(40, 50)):
    """Write root/<split>/<class>/img_<i>.JPEG with real JPEG files."""
    root = Path(root)
    rng = np.random.default_rng(0)
    for split, classes in classes_per_split.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for class_name in classes:
            class_dir = root / split / class_name
            class_dir.mkdir()
            for i in range(images_per_class):
                pixels = rng.integers(0, 256, size=(size_wh[1], size_wh[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(class_dir / f"img_{i}.JPEG", format="JPEG")


# --- running the training scripts as a user does ----------------------------------------------------

REPO_ROOT = Path(_ROOT)
CIFAR_MAIN = REPO_ROOT / "cifar" / "main.py"
IMAGENET_MAIN = REPO_ROOT / "imagenet" / "main.py"
RUN_TIMEOUT_S = 300
CHECKPOINT_POLL_S = 0.01
# What every run of the tests shares: no GPU, no worker processes, a log line per iteration.
COMMON_FLAGS = ("--gpus", "0", "-j", "0", "-p", "1")
# A small synthetic CIFAR-like set: 4 training batches of 32 and one validation batch.
FAKE_FLAGS = ("--dataset", "fake", "--fake_size", "128,64", "-b", "32")
_TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def script_env():
    """The environment of a script run: one OpenMP thread and no torchrun variables leaking in.

    One thread because the tests run two scripts at a time on two cores: OpenMP threads that
    compete for busy cores slow a run down by an order of magnitude.
    """
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


class ScriptRun:
    """A command started in the background whose output goes to files, so that several runs at once
    never block on a full pipe; :meth:`wait` returns a :class:`subprocess.CompletedProcess`."""

    def __init__(self, argv, cwd=REPO_ROOT):
        self.argv = [str(a) for a in argv]
        self._out = tempfile.TemporaryFile("w+")
        self._err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(self.argv, cwd=cwd, env=script_env(), stdout=self._out,
                                     stderr=self._err, text=True)

    def _read(self):
        texts = []
        for handle in (self._out, self._err):
            handle.seek(0)
            texts.append(handle.read())
            handle.close()
        return texts

    def wait(self, timeout=RUN_TIMEOUT_S):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            out, err = self._read()
            pytest.fail(f"{' '.join(self.argv)} ran longer than {timeout} s\n--- stdout\n{out[-3000:]}"
                        f"\n--- stderr\n{err[-3000:]}")
        out, err = self._read()
        return subprocess.CompletedProcess(self.argv, self.proc.returncode, out, err)


def start_main(script, *flags, cwd=REPO_ROOT):
    """Start ``python <script> <flags>`` (``script`` relative to ``cwd`` or absolute) in the background."""
    return ScriptRun([sys.executable, script, *flags], cwd=cwd)


def run_main(script, *flags, cwd=REPO_ROOT, timeout=RUN_TIMEOUT_S):
    """Run ``python <script> <flags>`` to the end and return its CompletedProcess."""
    return start_main(script, *flags, cwd=cwd).wait(timeout)


def kill_after_first_checkpoint(run, checkpoint, timeout=RUN_TIMEOUT_S):
    """SIGKILL ``run`` as soon as its ``checkpoint`` file appears (the first epoch is done and the next
    one under way); returns the killed run's CompletedProcess. Fails when the run ends by itself first."""
    deadline = time.monotonic() + timeout
    while not checkpoint.exists() and run.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(CHECKPOINT_POLL_S)
    still_running = run.proc.poll() is None
    run.proc.send_signal(signal.SIGKILL)
    result = run.wait()
    assert still_running and checkpoint.exists(), (
        "the run ended before it could be killed after its first checkpoint; give it more epochs or a larger "
        "--fake_size\n" + explain(result))
    return result


def explain(result):
    """The command, exit status and output tails of a finished run, for assertion messages."""
    return (f"command: {' '.join(map(str, result.args))}\nexit status {result.returncode}\n"
            f"--- stdout (tail)\n{result.stdout[-4000:]}\n--- stderr (tail)\n{result.stderr[-4000:]}")


def assert_ok(result):
    assert result.returncode == 0, explain(result)


def read_summary(path):
    """Rows of a run's summary.csv as dicts of floats (empty cells become None)."""
    with open(path, newline="") as handle:
        return [{k: float(v) if v != "" else None for k, v in row.items()} for row in csv.DictReader(handle)]


@pytest.fixture(scope="session")
def fake_cifar_run(tmp_path_factory):
    """Two epochs of ``cd cifar && python main.py`` on the fake set with ``--alpha 8``; its run folder.

    Shared by the training tests (outputs, ``-e``) and the error tests (checkpoints to break).
    """
    results = tmp_path_factory.mktemp("fake_cifar_run")
    flags = (*FAKE_FLAGS, *COMMON_FLAGS, "--epochs", "2", "--alpha", "8", "--results_dir", results,
             "--save", "_a8")
    result = run_main("main.py", *flags, cwd=REPO_ROOT / "cifar")
    assert_ok(result)
    return {"result": result, "folder": results / "resnet20_1w1a_a8"}


# --- in-process helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: the tests share two busy cores with other jobs, where tiny
    tensors run several times faster on one thread than on two."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_batch_norms(model, mean_std=0.2, var=(0.5, 1.5), weight=(0.5, 1.5), bias_mean=0.0, bias_std=0.2):
    """Give every BatchNorm non-trivial statistics and affine parameters, so eval outputs use all of them."""
    import torch
    import torch.nn as nn
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_(0, mean_std)
                m.running_var.uniform_(*var)
                m.weight.uniform_(*weight)
                m.bias.normal_(bias_mean, bias_std)
    return model


# --- several script runs at once ------------------------------------------------------------------------

BACKGROUND_WIDTH = 2  # one single-threaded run per core


def pytest_configure(config):
    config.addinivalue_line("markers", "uses(*names): background runs (by name) whose results the test reads")


def selected_uses(request):
    """Names in the ``uses`` marks of the selected tests of the requesting module, so that a test
    module starts only the background runs that its selected tests read."""
    return {name for item in request.session.items if item.module is request.module
            for mark in item.iter_markers("uses") for name in mark.args}


class Background:
    """Runs tasks (callables that usually wait on one script run) ``BACKGROUND_WIDTH`` at a time on
    threads while the tests go on; ``background[name]`` waits for a task and returns its result."""

    def __init__(self, wanted):
        self.wanted = set(wanted)
        self._pool = ThreadPoolExecutor(BACKGROUND_WIDTH)
        self._futures = {}

    def submit(self, name, task, *args):
        """Start ``task(*args)`` unless no selected test uses ``name``."""
        if name in self.wanted:
            self._futures[name] = self._pool.submit(task, *args)

    def __getitem__(self, name):
        return self._futures[name].result()

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)
