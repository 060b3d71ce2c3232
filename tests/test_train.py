"""End-to-end runs of ``cifar/main.py`` and ``imagenet/main.py`` as a user types them, on CPU.

The scripts run in subprocesses (one OpenMP thread each) on data written here: the synthetic
``fake`` set, CIFAR pickles and a JPEG class tree in the real on-disk formats, and scikit-learn's
``digits``. Runs that no other run depends on start together in the background (two at a time)
when the module starts; the tests then check run folders, checkpoints and ``-e`` evaluations
against independent references: closed-form schedules, a fresh model loading the saved weights,
an uninterrupted run for resume, a single process for DDP.
"""
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time

import pytest
import torch
import torch.nn as nn

import models
from conftest import (CIFAR_MAIN, COMMON_FLAGS, FAKE_FLAGS, IMAGENET_MAIN, REPO_ROOT, Background, ScriptRun,
                      assert_ok, explain, kill_after_first_checkpoint, read_summary, run_main, selected_uses,
                      start_main, write_cifar10, write_cifar100, write_image_folder)
from modules.binary import BinarizeConv2d
from modules.lcr import LCR_SCALE

CHECKPOINT_KEYS = {"format_version", "model", "num_classes", "dataset", "state_dict", "epoch", "optimizer",
                   "scheduler", "extra", "best_top1", "best_top5", "best_epoch", "history", "args"}
SUMMARY_COLUMNS = {"epoch", "lr", "ede_t", "train_loss", "train_ce", "train_lcr", "train_lcr_share", "val_loss",
                   "val_top1", "val_top5", "best_top1", "sigma_ratio_mean"}
RUN_FILES = {"log.txt", "args.json", "provenance.json", "summary.csv", "tb", "checkpoint.pth.tar",
             "model_best.pth.tar", ".lock"}
FINISHED = re.compile(r"finished in \S+: best top-1")
DEFAULT_LR, DEFAULT_TMIN, DEFAULT_TMAX = 0.1, 1e-3, 10.0
EVALUATE_LINE = re.compile(r"top-1 ([\d.]+)\s+top-5 ([\d.]+)\s+loss ([\d.]+)\s+over (\d+) images")
NO_GPU_NOTICE = "no GPU found: running on CPU"
# The per-epoch empirical Lipschitz estimate is checked by the fake and resume runs; elsewhere it
# would only add nine forward passes over 64 images to every epoch.
NO_LIP = ("--lip_images", "0")
DIGITS_MIN_TOP1 = 60.0  # %; chance is 10 %


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_folder(results_dir, model="resnet20_1w1a", save=""):
    return results_dir / f"{model}{save}"


def evaluation(result):
    """(top-1, top-5, loss, images) printed by an ``-e`` run."""
    match = EVALUATE_LINE.search(result.stdout)
    assert match, "no 'top-1 ... over N images' line\n" + explain(result)
    top1, top5, loss, count = match.groups()
    return float(top1), float(top5), float(loss), int(count)


# --- the background runs ----------------------------------------------------------------------------


def _readme_spelling_run(results):
    """``cd imagenet && python main.py --save='v0' --gpus='0' --batch_size=16 --alpha=8``, through a shell."""
    command = (f"{shlex.quote(sys.executable)} main.py --dataset=fake --fake_image_size=64 -a resnet18_1w1a_IR "
               f"--fake_size=32,16 --epochs=1 -j 0 -p 1 --lip_images=0 --results_dir={shlex.quote(str(results))} "
               f"--save='v0' --gpus='0' --batch_size=16 --alpha=8")
    return ScriptRun(["sh", "-c", command], cwd=REPO_ROOT / "imagenet").wait()


def _torchrun_then_single_process(results):
    """One epoch under ``torchrun`` with two CPU processes, then ``-e`` of its checkpoint in one process."""
    data = ("--dataset", "fake", "--fake_size", "128,50", "-bt", "16", "--gpus", "0", *NO_LIP)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", CIFAR_MAIN,
            *data, "-b", "32", "-p", "1", "--workers", "0", "--epochs", "1", "--results_dir", results / "ddp"]
    distributed = ScriptRun(argv).wait()
    single = None
    if distributed.returncode == 0:
        single = run_main(CIFAR_MAIN, *data, "-j", "0", "--results_dir", results / "eval",
                          "-e", run_folder(results / "ddp") / "checkpoint.pth.tar")
    return distributed, single


def _digits_then_evaluate(results):
    """A short digits run, then ``-e`` of its best checkpoint with no dataset or model flag."""
    trained = run_main(CIFAR_MAIN, "--dataset", "digits", "--epochs", "4", "-b", "64", "--alpha", "1",
                       "--gpus", "0", "-j", "0", *NO_LIP, "--results_dir", results)
    evaluated = run_main(CIFAR_MAIN, "-j", "0", "-e", run_folder(results) / "model_best.pth.tar")
    return trained, evaluated


def _resume_with_another_length(source, results):
    shutil.copytree(source, results / source.name)
    return run_main(CIFAR_MAIN, *FAKE_FLAGS, *COMMON_FLAGS, "--epochs", "3", "--alpha", "8", "--save", "_a8",
                    "--results_dir", results, "--resume")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """Where the background runs keep their data and run folders."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module", autouse=True)
def runs(request, runs_dir):
    """The module's background runs by name, started with the module (so they overlap its other
    tests); only those that the selected tests use are started."""
    tmp = runs_dir
    background = Background(selected_uses(request))
    cifar = (*COMMON_FLAGS, *NO_LIP, "--epochs", "1")
    background.submit("digits", _digits_then_evaluate, tmp / "digits")
    background.submit("channels_last amp", run_main, CIFAR_MAIN, *FAKE_FLAGS, *COMMON_FLAGS, "--epochs", "1",
                      "--alpha", "8", *NO_LIP, "--channels_last", "--amp", "--precise_bn", "3",
                      "--results_dir", tmp / "cl_amp")
    background.submit("torchrun", _torchrun_then_single_process, tmp / "torchrun")
    if "imagenet jpeg" in background.wanted:
        classes = ["n01440764", "n01443537", "n01484850"]
        write_image_folder(tmp / "imagenet", {"train": classes, "val": classes}, images_per_class=2)
    background.submit("imagenet jpeg", run_main, IMAGENET_MAIN, "--dataset", "imagenet", "--data_path",
                      tmp / "imagenet", "-a", "resnet18_1w1a_IR", "-b", "4", "-bt", "4", *cifar,
                      "--results_dir", tmp / "imagenet_run")
    background.submit("readme spelling", _readme_spelling_run, tmp / "readme")
    alpha0 = (*FAKE_FLAGS, "--gpus", "0", "-p", "1", *NO_LIP, "--epochs", "1", "--alpha", "0",
              "--results_dir", tmp / "alpha0")
    background.submit("alpha0 j0", run_main, CIFAR_MAIN, *alpha0, "-j", "0", "--save", "_j0")
    background.submit("alpha0 j2", run_main, CIFAR_MAIN, *alpha0, "-j", "2", "--save", "_j2")
    if background.wanted & {"cifar pickles c10", "cifar pickles c100"}:
        write_cifar10(tmp / "c10", n_per_batch=6, n_test=10)
        write_cifar100(tmp / "c100", n_train=20, n_test=8)
    for name in ("c10", "c100"):
        dataset = {"c10": "cifar10", "c100": "cifar100"}[name]
        background.submit(f"cifar pickles {name}", run_main, CIFAR_MAIN, "--dataset", dataset, "--data_path",
                          tmp / name, "-b", "32", *cifar, "--results_dir", tmp / "cifar", "--save", f"_{name}")

    if background.wanted & {"evaluate checkpoint", "evaluate bare", "evaluate dataparallel", "other schedule"}:
        folder = request.getfixturevalue("fake_cifar_run")["folder"]
        state_dict = load(folder / "checkpoint.pth.tar")["state_dict"]
        torch.save(state_dict, tmp / "bare.pth")
        model = models.create_model("resnet20_1w1a", num_classes=10)
        model.load_state_dict(state_dict)
        torch.save(nn.DataParallel(model).state_dict(), tmp / "dataparallel.pth")
        for name, path in (("checkpoint", folder / "checkpoint.pth.tar"), ("bare", tmp / "bare.pth"),
                           ("dataparallel", tmp / "dataparallel.pth")):
            # a bare state dict says nothing of its model and data: the user names them
            named = () if name == "checkpoint" else (*FAKE_FLAGS, "-a", "resnet20_1w1a")
            background.submit(f"evaluate {name}", run_main, CIFAR_MAIN, *named, *COMMON_FLAGS,
                              "--results_dir", tmp / "eval", "--save", f"_{name}", "-e", path)
        background.submit("other schedule", _resume_with_another_length, folder, tmp / "other_schedule")
    yield background
    background.close()


# --- one fake run, every record it leaves -------------------------------------------------------------


def test_fake_run_leaves_log_args_board_summary_and_checkpoints(fake_cifar_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, result = fake_cifar_run["folder"], fake_cifar_run["result"]
    assert RUN_FILES <= set(os.listdir(folder))
    notices = [line for line in result.stdout.splitlines() if NO_GPU_NOTICE in line]
    assert len(notices) == 1 and "--gpus 0" in notices[0]
    assert len(FINISHED.findall((folder / "log.txt").read_text())) == 1

    args = json.loads((folder / "args.json").read_text())
    assert args["alpha"] == 8.0 and args["epochs"] == 2 and args["dataset"] == "fake"
    assert args["fake_size"] == [128, 64] and args["batch_size"] == 32 and args["lr"] == DEFAULT_LR

    rows = read_summary(folder / "summary.csv")
    assert [row["epoch"] for row in rows] == [0, 1]
    assert SUMMARY_COLUMNS <= set(rows[0])
    assert rows[-1]["best_top1"] == max(row["val_top1"] for row in rows)

    events = [name for name in os.listdir(folder / "tb") if name.startswith("events.out.tfevents")]
    assert len(events) == 1
    board = EventAccumulator(str(folder / "tb"))
    board.Reload()
    assert [e.value for e in board.Scalars("val_top1")] == pytest.approx([row["val_top1"] for row in rows])
    assert {"lr", "ede_t", "train_lcr"} <= set(board.Tags()["scalars"])


def test_checkpoint_schema_and_weights(fake_cifar_run):
    folder = fake_cifar_run["folder"]
    rows = read_summary(folder / "summary.csv")
    state = load(folder / "checkpoint.pth.tar")
    assert set(state) == CHECKPOINT_KEYS
    assert state["format_version"] == 2 and state["model"] == "resnet20_1w1a" and state["num_classes"] == 10
    assert state["epoch"] == 2 and state["dataset"] == "fake" and state["extra"] == {}
    assert [h["val_top1"] for h in state["history"]] == [row["val_top1"] for row in rows]
    assert (state["best_top1"], state["best_top5"]) == (rows[-1]["best_top1"], rows[-1]["best_top5"])
    top1 = [row["val_top1"] for row in rows]
    assert state["best_epoch"] == top1.index(max(top1))
    assert state["args"]["alpha"] == 8.0 and state["args"]["epochs"] == 2
    assert state["optimizer"]["state"], "the optimizer state has no momentum buffers"

    model = models.create_model("resnet20_1w1a", num_classes=10)
    model.load_state_dict(state["state_dict"], strict=True)
    # The EDE buffers hold the last epoch's t and k = max(1/t, 1).
    t_last = rows[-1]["ede_t"]
    binary = [m for m in model.modules() if isinstance(m, BinarizeConv2d)]
    assert binary and all(m.t.item() == pytest.approx(t_last) for m in binary)
    assert all(m.k.item() == pytest.approx(max(1 / t_last, 1.0)) for m in binary)

    best = load(folder / "model_best.pth.tar")
    top1 = [row["val_top1"] for row in rows]
    assert best["epoch"] == top1.index(max(top1)) + 1 and best["best_top1"] == max(top1)


def test_lr_is_cosine_and_ede_t_is_geometric(fake_cifar_run):
    rows = read_summary(fake_cifar_run["folder"] / "summary.csv")
    epochs = len(rows)
    for row in rows:
        e = row["epoch"]
        assert row["lr"] == pytest.approx(DEFAULT_LR * 0.5 * (1 + math.cos(math.pi * e / epochs)), abs=1e-12)
        assert row["ede_t"] == pytest.approx(DEFAULT_TMIN * (DEFAULT_TMAX / DEFAULT_TMIN) ** (e / epochs))
    assert rows[1]["lr"] == pytest.approx(0.05)


def test_training_loss_is_ce_plus_weighted_lcr(fake_cifar_run):
    weight = 8.0 * LCR_SCALE
    for row in read_summary(fake_cifar_run["folder"] / "summary.csv"):
        assert row["train_lcr"] > 0 and row["sigma_ratio_mean"] > 0
        assert row["train_loss"] == pytest.approx(row["train_ce"] + weight * row["train_lcr"], rel=1e-5)
        assert row["train_lcr_share"] == pytest.approx(weight * row["train_lcr"] / row["train_loss"], rel=1e-5)


# --- alpha 0 and worker processes ---------------------------------------------------------------------


@pytest.mark.uses("alpha0 j0")
def test_alpha0_trains_plain_irnet(runs, runs_dir, fake_cifar_run):
    result = runs["alpha0 j0"]
    assert_ok(result)
    folder = run_folder(runs_dir / "alpha0", save="_j0")
    rows = read_summary(folder / "summary.csv")
    assert len(rows) == 1
    assert rows[0]["train_lcr"] == 0 and rows[0]["train_lcr_share"] == 0
    assert rows[0]["train_loss"] == rows[0]["train_ce"]
    assert not [column for column in rows[0] if column.startswith("sigma_ratio")]
    assert json.loads((folder / "args.json").read_text())["alpha"] == 0.0

    # Same data, seed, first-epoch lr and EDE t: only the regulariser differs.
    with_lcr = read_summary(fake_cifar_run["folder"] / "summary.csv")[0]
    assert (with_lcr["lr"], with_lcr["ede_t"]) == (rows[0]["lr"], rows[0]["ede_t"])
    assert with_lcr["train_loss"] != rows[0]["train_loss"]
    assert with_lcr["train_ce"] != rows[0]["train_ce"]


@pytest.mark.slow(reason="a second 1-epoch run, with two DataLoader worker processes: about 10 s of CPU")
@pytest.mark.uses("alpha0 j0", "alpha0 j2")
def test_worker_processes_give_the_same_run(runs, runs_dir):
    j0, j2 = runs["alpha0 j0"], runs["alpha0 j2"]
    assert_ok(j2)
    assert_ok(j0)
    # fake images depend only on their index, and the sampler lives in the main process
    keys = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5")
    row0 = read_summary(run_folder(runs_dir / "alpha0", save="_j0") / "summary.csv")[0]
    row2 = read_summary(run_folder(runs_dir / "alpha0", save="_j2") / "summary.csv")[0]
    assert {k: row2[k] for k in keys} == {k: row0[k] for k in keys}


# --- ImageNet script, other datasets --------------------------------------------------------------------


@pytest.mark.uses("readme spelling")
def test_imagenet_script_with_readme_flag_spelling(runs, runs_dir):
    result = runs["readme spelling"]
    assert_ok(result)
    folder = run_folder(runs_dir / "readme", "resnet18_1w1a_IR", "v0")
    args = json.loads((folder / "args.json").read_text())
    assert (args["save"], args["gpus"], args["batch_size"], args["alpha"]) == ("v0", "0", 16, 8.0)
    assert args["fake_image_size"] == 64 and args["model"] == "resnet18_1w1a_IR"
    assert "32 training and 16 validation images, 10 classes" in result.stdout
    provenance = json.loads((folder / "provenance.json").read_text())
    assert len(provenance) == 1 and provenance[0]["device"] == "cpu" and provenance[0]["threads"] == 1
    assert provenance[0]["world_size"] == 1 and provenance[0]["torch"] == torch.__version__
    assert "--save=v0" in provenance[0]["command"] and len(provenance[0]["git_commit"] or "x" * 40) == 40
    assert len(read_summary(folder / "summary.csv")) == 1
    state = load(folder / "checkpoint.pth.tar")
    assert state["model"] == "resnet18_1w1a_IR" and state["epoch"] == 1
    models.create_model("resnet18_1w1a_IR", num_classes=10).load_state_dict(state["state_dict"])


@pytest.mark.uses("cifar pickles c10", "cifar pickles c100")
def test_cifar10_and_cifar100_pickles(runs, runs_dir):
    for name, n_train, n_val, classes in (("c10", 30, 10, 10), ("c100", 20, 8, 100)):
        result = runs[f"cifar pickles {name}"]
        assert_ok(result)
        assert f"{n_train} training and {n_val} validation images, {classes} classes" in result.stdout
        folder = run_folder(runs_dir / "cifar", save=f"_{name}")
        assert len(read_summary(folder / "summary.csv")) == 1
        state = load(folder / "checkpoint.pth.tar")
        assert state["num_classes"] == classes
        models.create_model("resnet20_1w1a", num_classes=classes).load_state_dict(state["state_dict"])


@pytest.mark.uses("imagenet jpeg")
def test_imagenet_jpeg_class_folders(runs, runs_dir):
    result = runs["imagenet jpeg"]
    assert_ok(result)
    assert "6 training and 6 validation images, 3 classes" in result.stdout
    folder = run_folder(runs_dir / "imagenet_run", "resnet18_1w1a_IR")
    assert len(read_summary(folder / "summary.csv")) == 1
    state = load(folder / "checkpoint.pth.tar")
    assert state["num_classes"] == 3
    models.create_model("resnet18_1w1a_IR", num_classes=3).load_state_dict(state["state_dict"])


# --- resume ---------------------------------------------------------------------------------------------

RESUME_FLAGS = (*FAKE_FLAGS, *COMMON_FLAGS, "--epochs", "3", "--seed", "7")


@pytest.mark.slow(reason="three 3-epoch runs, one killed and resumed: about a minute; the resume rules themselves "
                        "are checked in the default set (test_reliability.py)")
def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path):
    straight = start_main(CIFAR_MAIN, *RESUME_FLAGS, "--results_dir", tmp_path / "straight")
    killed = start_main(CIFAR_MAIN, *RESUME_FLAGS, "--results_dir", tmp_path / "killed")
    checkpoint = run_folder(tmp_path / "killed") / "checkpoint.pth.tar"
    assert kill_after_first_checkpoint(killed, checkpoint).returncode == -signal.SIGKILL
    epochs_done = load(checkpoint)["epoch"]
    assert 1 <= epochs_done < 3
    shutil.copy(checkpoint, tmp_path / "saved.pth.tar")
    reference = straight.wait()
    assert_ok(reference)

    resumed = start_main(CIFAR_MAIN, *RESUME_FLAGS, "--results_dir", tmp_path / "killed", "--resume")
    explicit = start_main(CIFAR_MAIN, *RESUME_FLAGS, "--results_dir", tmp_path / "explicit",
                          "--resume", tmp_path / "saved.pth.tar")
    finished = {"killed": resumed.wait(), "explicit": explicit.wait()}
    expected_rows = read_summary(run_folder(tmp_path / "straight") / "summary.csv")
    expected_state = load(run_folder(tmp_path / "straight") / "checkpoint.pth.tar")["state_dict"]
    assert len(expected_rows) == 3
    for results_dir, result in finished.items():
        assert_ok(result)
        assert f"{epochs_done} epochs done" in result.stdout
        rows = read_summary(run_folder(tmp_path / results_dir) / "summary.csv")
        assert len(rows) == 3
        keys = ("val_top1", "val_loss", "train_loss", "lr", "ede_t", "lipschitz_emp")
        for row, expected in zip(rows, expected_rows):
            for key in keys:
                assert row[key] == pytest.approx(expected[key], abs=1e-6), (results_dir, row["epoch"], key)
        state = load(run_folder(tmp_path / results_dir) / "checkpoint.pth.tar")
        assert state["epoch"] == 3
        assert state["state_dict"].keys() == expected_state.keys()
        differ = [k for k, v in state["state_dict"].items() if not torch.equal(v, expected_state[k])]
        assert not differ, f"{results_dir}: {len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


@pytest.mark.slow(reason="a resumed 3-epoch run: about 15 s of waiting; the rule that a resume refuses changed "
                        "run flags by name is checked in the default set (test_reliability.py)")
@pytest.mark.uses("other schedule")
def test_resume_refuses_another_schedule(runs, runs_dir, fake_cifar_run):
    # The checkpoint's scheduler state holds the lr factor of its own --epochs, so a resume with
    # another length would follow neither schedule; the run must refuse and leave the folder alone.
    result = runs["other schedule"]
    assert result.returncode == 1, explain(result)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--epochs 2 -> 3" in last, explain(result)
    folder = run_folder(runs_dir / "other_schedule", save="_a8")
    for name in ("checkpoint.pth.tar", "summary.csv"):
        assert (folder / name).read_bytes() == (fake_cifar_run["folder"] / name).read_bytes(), name


# --- atomic checkpoint writes ---------------------------------------------------------------------------

BIG_TENSOR_NUMEL = 12_500_000  # float32: 50 MB


def test_save_atomic_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    from utils import checkpoint

    target = tmp_path / "checkpoint.pth.tar"
    checkpoint.save_atomic({"epoch": 1, "w": torch.arange(10.0)}, target)
    before = target.read_bytes()

    def torn_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half of a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"epoch": 2, "w": torch.zeros(10)}, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]
    assert load(target)["epoch"] == 1


WRITER = f"""
import sys
import torch
from utils.checkpoint import save_atomic
state = {{"w": torch.arange({BIG_TENSOR_NUMEL}, dtype=torch.float32), "round": 0}}
while True:
    state["round"] += 1
    save_atomic(state, sys.argv[1])
"""


@pytest.mark.parametrize("when", ["while the temporary file grows", "0.2 s into the saving loop"])
def test_kill_during_a_large_save_leaves_a_loadable_file(tmp_path, when):
    target = tmp_path / "big.pth.tar"
    torch.save({"w": torch.arange(BIG_TENSOR_NUMEL, dtype=torch.float32), "round": 0}, target)
    writer = ScriptRun([sys.executable, "-c", WRITER, target])
    deadline = time.monotonic() + 120

    def waiting():
        return writer.proc.poll() is None and time.monotonic() < deadline

    if when.startswith("while"):
        # a temporary file beside the target with bytes in it: a write is in flight
        while waiting() and not any(p != target and p.stat().st_size > 0 for p in tmp_path.iterdir()):
            time.sleep(0.001)
    else:
        first = target.stat().st_mtime_ns
        while waiting() and target.stat().st_mtime_ns == first:
            time.sleep(0.01)
        time.sleep(0.2)
    still_running = writer.proc.poll() is None
    writer.proc.send_signal(signal.SIGKILL)
    result = writer.wait()
    assert still_running, "the writer stopped by itself\n" + explain(result)
    state = load(target)
    assert torch.equal(state["w"], torch.arange(BIG_TENSOR_NUMEL, dtype=torch.float32))


# --- evaluate -------------------------------------------------------------------------------------------


@pytest.mark.uses("evaluate checkpoint", "evaluate bare", "evaluate dataparallel")
def test_evaluate_checkpoint_bare_and_dataparallel_state_dicts(runs, runs_dir, fake_cifar_run):
    last = read_summary(fake_cifar_run["folder"] / "summary.csv")[-1]
    assert all(k.startswith("module.") for k in load(runs_dir / "dataparallel.pth"))
    for name in ("evaluate checkpoint", "evaluate bare", "evaluate dataparallel"):
        result = runs[name]
        assert_ok(result)
        top1, top5, loss, count = evaluation(result)
        assert count == 64, name
        # 64 images: every accuracy is a multiple of 1/64 and exact at two decimals
        assert (top1, top5) == (round(last["val_top1"], 2), round(last["val_top5"], 2)), name
        assert loss == pytest.approx(last["val_loss"], abs=1e-4), name


# --- DDP ------------------------------------------------------------------------------------------------


@pytest.mark.slow(reason="three processes (torchrun and its two ranks) plus an evaluation: about 20 s of CPU; "
                        "the gradient averaging over ranks and the sharding of the validation set are "
                        "checked in the default set (test_distributed_sync.py, test_device_data.py)")
@pytest.mark.uses("torchrun")
def test_torchrun_two_processes_cover_the_validation_set_once(runs, runs_dir):
    distributed, single = runs["torchrun"]
    assert distributed.returncode == 0, "torchrun failed (its output says why)\n" + explain(distributed)
    folder = run_folder(runs_dir / "torchrun" / "ddp")
    assert set(os.listdir(folder)) == RUN_FILES | {"checkpoint_eval_fake.json"}    # the -e below wrote the last
    assert len(os.listdir(folder / "tb")) == 1
    log = (folder / "log.txt").read_text()
    assert len(FINISHED.findall(log)) == 1 and log.count("arguments:") == 1
    assert len(FINISHED.findall(distributed.stdout)) == 1
    assert "2 process(es)" in distributed.stdout
    assert json.loads((folder / "provenance.json").read_text())[0]["world_size"] == 2
    rows = read_summary(folder / "summary.csv")
    assert len(rows) == 1

    assert_ok(single)
    top1, top5, loss, count = evaluation(single)
    assert count == 50
    # 50 images: accuracies are multiples of 2 %, so equal values mean equal counts
    assert (top1, top5) == (rows[0]["val_top1"], rows[0]["val_top5"])
    assert loss == pytest.approx(rows[0]["val_loss"], abs=1e-4)


# --- learning -------------------------------------------------------------------------------------------


@pytest.mark.uses("digits")
def test_evaluate_takes_dataset_and_model_from_the_checkpoint(runs, runs_dir):
    trained, evaluated = runs["digits"]
    assert_ok(trained)
    assert_ok(evaluated)
    top1, _, _, count = evaluation(evaluated)
    assert count == 450 and "resnet20_1w1a on digits" in evaluated.stdout
    rows = read_summary(run_folder(runs_dir / "digits") / "summary.csv")
    assert top1 == round(max(row["val_top1"] for row in rows), 2)
    saved = json.loads((run_folder(runs_dir / "digits") / "model_best_eval_digits.json").read_text())
    assert saved["count"] == 450 and saved["dataset"] == "digits" and saved["top1"] == pytest.approx(top1, abs=0.005)


@pytest.mark.uses("channels_last amp")
def test_channels_last_and_amp_flags_train_on_cpu(runs, runs_dir):
    result = runs["channels_last amp"]
    assert_ok(result)
    assert "--amp: bfloat16 autocast is for GPUs; training on the CPU in fp32" in result.stdout
    row = read_summary(run_folder(runs_dir / "cl_amp") / "summary.csv")[0]
    assert row["train_lcr"] > 0 and 0 <= row["val_top1"] <= 100
    # --precise_bn 3: the saved BatchNorm statistics are plain averages over 3 of the 4 training
    # batches, not the momentum average of the 4 training steps
    state = load(run_folder(runs_dir / "cl_amp") / "checkpoint.pth.tar")["state_dict"]
    tracked = {int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
    assert tracked == {3}


def test_recalibrate_batchnorm_gives_plain_averages_over_the_batches():
    from utils.engine import recalibrate_batchnorm
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    batches = [(torch.randn(5, 3, 2, 2) * (i + 1) + i, torch.zeros(5)) for i in range(4)]
    # a batch whose images were all unreadable arrives as None and is skipped
    recalibrate_batchnorm(net, [batches[0], None, *batches[1:]], "cpu", 4)
    # reference: the mean of the per-batch means and of the per-batch unbiased variances
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x, _ in batches[:3]])
    variances = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1) for x, _ in batches[:3]])
    torch.testing.assert_close(net[0].running_mean, means.mean(0))
    torch.testing.assert_close(net[0].running_var, variances.mean(0))
    assert not net.training and net[0].momentum == 0.1 and int(net[2].num_batches_tracked) == 3


def test_model_recipe_fills_every_flag_the_user_does_not_give():
    from utils import options
    vgg = options.parse_args(options.CIFAR_DEFAULTS, "t", ["--model", "vgg_small_1w1a"])
    # htqin/IR-Net CIFAR-10/VGG-Small/main.py: lr 0.007, 300 epochs, batch 128, t from 0.1 to 10
    assert (vgg.lr, vgg.epochs, vgg.batch_size, vgg.Tmin, vgg.Tmax) == (0.007, 300, 128, 0.1, 10.0)
    assert (vgg.momentum, vgg.weight_decay, vgg.lr_type, vgg.warm_up) == (0.9, 1e-4, "cos", False)
    resnet = options.parse_args(options.CIFAR_DEFAULTS, "t", [])
    # htqin/IR-Net CIFAR-10/ResNet20/1w1a/trainer.py: lr 0.1, 400 epochs, batch 128, t from 1e-3 to 10
    assert (resnet.model, resnet.lr, resnet.epochs, resnet.batch_size, resnet.Tmin) == ("resnet20_1w1a", 0.1, 400, 128,
                                                                                        1e-3)
    assert resnet.model_fp == "resnet20_fp"
    given = options.parse_args(options.CIFAR_DEFAULTS, "t", ["--model", "vgg_small_1w1a", "--lr", "0.05", "--Tmin",
                                                             "0.001", "--warm_up"])
    assert (given.lr, given.Tmin, given.warm_up, given.epochs) == (0.05, 0.001, True, 300)
    imagenet = options.parse_args(options.IMAGENET_DEFAULTS, "t", [])
    # 42Shawn/LCR_BNN LCR/imagenet: 100 epochs, lr 0.1, batch 128 as in its README, FP net resnet18_fp
    assert (imagenet.epochs, imagenet.lr, imagenet.batch_size, imagenet.model_fp) == (100, 0.1, 128, "resnet18_fp")


def test_each_script_offers_only_its_own_flags_and_models(capsys):
    from utils import options
    for defaults, present, absent in ((options.IMAGENET_DEFAULTS, ["resnet18_1w1a_IR"], ["--download", "--gpu_data",
                                                                                          "resnet20_1w1a"]),
                                      (options.CIFAR_DEFAULTS, ["--download", "--gpu_data", "resnet20_1w1a"],
                                       ["resnet18_1w1a_IR"])):
        text = options.get_args_parser(defaults, "t").format_help()
        assert all(p in text for p in present) and not any(a in text for a in absent), text


@pytest.mark.uses("digits")
def test_digits_learns(runs, runs_dir):
    result, _ = runs["digits"]
    assert_ok(result)
    rows = read_summary(run_folder(runs_dir / "digits") / "summary.csv")
    assert len(rows) == 4
    # the best epoch, not the last: with the regulariser on, a binary net's eval accuracy can dip
    # for an epoch while its batch-norm statistics catch up with sign flips
    assert max(row["val_top1"] for row in rows) >= DIGITS_MIN_TOP1, [row["val_top1"] for row in rows]
    assert rows[-1]["train_lcr"] > 0
