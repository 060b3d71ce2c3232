"""No result is ever lost or silently wrong: the training scripts and tools under faults and misuse.

Each test names the promise it checks (README, "What is guaranteed"). Where the behaviour is the
script's, the script runs in a subprocess as a user types it; the module's runs start together in
the background (two at a time) and the tests read their results.
"""
import math
import os
import pickle
import shutil
import fcntl
import signal
import subprocess
import sys
import time
import zlib

import pytest
import torch

import models
from conftest import (CIFAR_MAIN, COMMON_FLAGS, IMAGENET_MAIN, REPO_ROOT, Background, ScriptRun,
                      assert_ok, explain, read_summary, run_main, script_env,
                      selected_uses, start_main, write_cifar10, write_image_folder)
from utils import checkpoint as ckpt
from utils import options
from utils.data import DataError, build_datasets, build_loaders
from utils.distributed import Runtime

NO_LIP = ("--lip_images", "0")
TINY = ("--dataset", "fake", "--fake_size", "64,32", "-b", "32", *COMMON_FLAGS, *NO_LIP)
RESULT_FILES = ("checkpoint.pth.tar", "model_best.pth.tar", "summary.csv", "args.json")


def one_error_line(result, *mentions):
    """The run failed with status 1 and exactly one ``error:`` line, on stderr, naming ``mentions``."""
    assert result.returncode == 1, explain(result)
    assert "Traceback" not in result.stdout + result.stderr, explain(result)
    lines = [ln for ln in (result.stdout + result.stderr).splitlines() if "error:" in ln]
    assert len(lines) == 1, f"{len(lines)} error lines\n" + explain(result)
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: "), explain(result)
    for mention in mentions:
        assert str(mention) in lines[0], f"{mention!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in RESULT_FILES if (folder / name).exists()}


def finished_run(source, results, name):
    """A copy of the finished 1-epoch run folder ``source`` as ``results/<name>``."""
    folder = results / name
    shutil.copytree(source, folder)
    return folder


# --- the background runs ------------------------------------------------------------------------------


def _one_epoch(results, *extra):
    return run_main(CIFAR_MAIN, *TINY, "--epochs", "1", "--results_dir", results, *extra)


def _summary_lost(source, results):
    """A finished run killed before its last summary.csv write: resume completes the records."""
    folder = finished_run(source, results, "resnet20_1w1a")
    (folder / "summary.csv").write_text((folder / "summary.csv").read_text().splitlines()[0] + "\n")
    return folder, run_main(CIFAR_MAIN, *TINY, "--epochs", "1", "--results_dir", results, "--resume")


def _best_lost(source, results):
    """A kill after checkpoint.pth.tar but before model_best.pth.tar of the first epoch."""
    folder = finished_run(source, results, "resnet20_1w1a")
    os.remove(folder / "model_best.pth.tar")
    return folder, run_main(CIFAR_MAIN, *TINY, "--epochs", "1", "--results_dir", results, "--resume")


def _two_at_once(results):
    """A second start into the folder of a live run; then the first is killed with SIGKILL."""
    first = start_main(CIFAR_MAIN, *TINY, "--epochs", "100", "--results_dir", results)
    folder = results / "resnet20_1w1a"
    deadline = time.monotonic() + 120
    while not (folder / "args.json").exists() and first.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    second = run_main(CIFAR_MAIN, *TINY, "--epochs", "100", "--results_dir", results, "--resume")
    still_running = first.proc.poll() is None
    first.proc.send_signal(signal.SIGKILL)
    first.wait()
    return folder, second, still_running


def _best_only(source, results):
    """A folder that keeps only model_best.pth.tar (as the README suggests), then a fresh run into it."""
    folder = finished_run(source, results, "resnet20_1w1a")
    for name in os.listdir(folder):
        if name != "model_best.pth.tar":
            path = folder / name
            shutil.rmtree(path) if path.is_dir() else os.remove(path)
    before = (folder / "model_best.pth.tar").read_bytes()
    return folder, before, _one_epoch(results)


def _resume_into_another_run(source, results):
    """``--resume other/checkpoint.pth.tar`` into a folder that holds a different run."""
    target = finished_run(source, results, "resnet20_1w1a_target")
    other = finished_run(source, results, "other")
    before = snapshot(target)
    result = run_main(CIFAR_MAIN, *TINY, "--epochs", "2", "--results_dir", results, "--save", "_target",
                      "--resume", other / "checkpoint.pth.tar")
    return target, before, result


def _changed_flags(source, results):
    folder = finished_run(source, results, "resnet20_1w1a")
    before = snapshot(folder)
    changed = ("--dataset", "fake", "--fake_size", "64,32", "-b", "16", *COMMON_FLAGS, *NO_LIP, "--epochs", "1",
               "--alpha", "4", "--seed", "9")
    return folder, before, run_main(CIFAR_MAIN, *changed, "--results_dir", results, "--resume")


def _malformed(source, results):
    """A resume from, and an evaluation of, a loadable checkpoint with a string format_version."""
    folder = finished_run(source, results, "resnet20_1w1a")
    state = torch.load(folder / "checkpoint.pth.tar", weights_only=True)
    state["format_version"] = "2"
    torch.save(state, folder / "checkpoint.pth.tar")
    del state["history"]
    state["format_version"] = 2
    torch.save(state, results / "no_history.pth.tar")
    return (run_main(CIFAR_MAIN, *TINY, "--epochs", "1", "--results_dir", results, "--resume"),
            run_main(CIFAR_MAIN, *COMMON_FLAGS, "-e", folder / "checkpoint.pth.tar"),
            run_main(CIFAR_MAIN, *TINY, "--epochs", "1", "--results_dir", results, "--save", "_nh",
                     "--resume", results / "no_history.pth.tar"))


def _nan_weights(source, results):
    results.mkdir(parents=True)
    state = torch.load(source / "checkpoint.pth.tar", weights_only=True)
    state["state_dict"]["fc.weight"][0, 0] = float("nan")
    torch.save(state, results / "nan.pth.tar")
    return run_main(CIFAR_MAIN, *COMMON_FLAGS, "-e", results / "nan.pth.tar")


def _unreadable_images(results):
    classes = ["n01", "n02"]
    write_image_folder(results / "data", {"train": classes, "val": classes}, images_per_class=4)
    (results / "data" / "train" / "n01" / "empty.JPEG").write_bytes(b"")
    (results / "data" / "train" / "n02" / "text.JPEG").write_text("not an image")
    whole = (results / "data" / "val" / "n01" / "img_0.JPEG").read_bytes()
    (results / "data" / "val" / "n01" / "truncated.JPEG").write_bytes(whole[:len(whole) // 3])
    # a valid PNG header that claims 60000 x 60000 pixels (and no image data)
    ihdr = b"IHDR" + (60000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
    header = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big")
    (results / "data" / "val" / "n02" / "huge.png").write_bytes(header)
    return run_main(IMAGENET_MAIN, "--data_path", results / "data", "-a", "resnet18_1w1a_IR", "-b", "4", "-bt", "4",
                    *COMMON_FLAGS, *NO_LIP, "--epochs", "1", "--results_dir", results / "runs")


def _file_as_results_dir(results):
    results.mkdir(parents=True)
    (results / "resnet20_1w1a").write_text("a file where the run folder should be")
    return _one_epoch(results)


def _fail_before_first_epoch(results):
    return results, run_main(CIFAR_MAIN, *COMMON_FLAGS, "--dataset", "cifar10", "--data_path", results / "nowhere",
                             "--results_dir", results)


def _torchrun_error(results):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", CIFAR_MAIN,
            "--dataset", "cifar10", "--data_path", results / "nowhere", *COMMON_FLAGS, "--results_dir", results]
    return ScriptRun(argv).wait()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished one-epoch fake run to copy (the runs below start from copies of it)."""
    results = tmp_path_factory.mktemp("source")
    assert_ok(_one_epoch(results))
    return results / "resnet20_1w1a"


@pytest.fixture(scope="module", autouse=True)
def runs(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    background = Background(selected_uses(request))
    background.submit("two at once", _two_at_once, tmp / "two")
    background.submit("unreadable images", _unreadable_images, tmp / "images")
    background.submit("file as results dir", _file_as_results_dir, tmp / "file")
    background.submit("fail before first epoch", _fail_before_first_epoch, tmp / "early")
    background.submit("torchrun error", _torchrun_error, tmp / "torchrun")
    needs_source = {"summary lost", "best lost", "best only", "resume into another run", "changed flags",
                    "malformed", "nan weights"}
    if background.wanted & needs_source:
        src = request.getfixturevalue("source")
        for name, task in (("summary lost", _summary_lost), ("best lost", _best_lost), ("best only", _best_only),
                           ("resume into another run", _resume_into_another_run), ("changed flags", _changed_flags),
                           ("malformed", _malformed), ("nan weights", _nan_weights)):
            background.submit(name, task, src, tmp / name.replace(" ", "_"))
    yield background
    background.close()


# --- results lost or silently wrong ----------------------------------------------------------------------


@pytest.mark.slow(reason="a 2-epoch run, then its resume: about 20 s; the other resume rules stay in the "
                        "default set")
@pytest.mark.uses("summary lost")
def test_resume_of_a_finished_run_completes_its_records(runs, source):
    folder, result = runs["summary lost"]
    assert_ok(result)
    assert "run already finished" in result.stdout
    assert read_summary(folder / "summary.csv") == read_summary(source / "summary.csv")


@pytest.mark.uses("best lost")
def test_a_kill_between_checkpoint_and_best_is_mended_on_resume(runs, source):
    folder, result = runs["best lost"]
    assert_ok(result)
    best = torch.load(folder / "model_best.pth.tar", weights_only=True)
    assert best["epoch"] == 1 and best["best_epoch"] == 0
    assert torch.equal(best["state_dict"]["fc.weight"],
                       torch.load(source / "model_best.pth.tar", weights_only=True)["state_dict"]["fc.weight"])


@pytest.mark.uses("two at once")
def test_a_run_folder_holds_one_live_run_and_a_killed_run_leaves_no_stuck_lock(runs):
    folder, second, still_running = runs["two at once"]
    assert still_running, "the first run ended before the second started"
    one_error_line(second, "in use by a live run", "--save")
    with open(folder / ".lock", "a+") as handle:        # the killed run's lock went with it
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.uses("best only")
def test_a_fresh_run_never_writes_into_a_folder_with_results(runs):
    folder, before, result = runs["best only"]
    one_error_line(result, folder, "--resume", "--save")
    assert (folder / "model_best.pth.tar").read_bytes() == before
    assert sorted(os.listdir(folder)) in (["model_best.pth.tar"], [".lock", "model_best.pth.tar"])


@pytest.mark.uses("resume into another run")
def test_resume_from_a_file_never_writes_into_another_run(runs):
    target, before, result = runs["resume into another run"]
    one_error_line(result, target, "another run")
    assert snapshot(target) == before


@pytest.mark.uses("changed flags")
def test_resume_refuses_changed_run_flags_by_name_and_keeps_args_json(runs):
    folder, before, result = runs["changed flags"]
    line = one_error_line(result, "--alpha 8.0 -> 4.0", "--seed 1234 -> 9", "--batch_size 32 -> 16")
    assert "--resume" in line or "flags it was started with" in line
    assert snapshot(folder) == before


NON_FINITE = [("--lr", "nan"), ("--lr", "inf"), ("--alpha", "nan"), ("--alpha", "inf"), ("--lip_eps", "nan"),
              ("--momentum", "nan"), ("--momentum", "1.5"), ("--weight_decay", "inf"), ("--weight_decay", "-1"),
              ("--Tmin", "nan"), ("--Tmax", "inf"), ("--seed", "-1"), ("--seed", str(2**32)), ("--threads", "-2")]


@pytest.mark.parametrize("flag,value", NON_FINITE)
def test_every_numeric_flag_is_validated(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        options.parse_args(options.CIFAR_DEFAULTS, "test", ["--dataset", "fake", flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err.splitlines()[-1]


def test_the_ablation_tool_rejects_non_finite_alphas(tmp_path, capsys):
    from tools import ablate_alpha
    for bad in ("nan", "inf", "-1"):
        with pytest.raises(SystemExit):
            ablate_alpha.main(["--alphas", "0", bad, "--out", str(tmp_path / "out"), "--", "--dataset", "fake"])
        assert "--alphas" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_non_finite_model_is_never_saved(tmp_path):
    from utils.runfolder import RunFolder
    from utils.trainer import NonFiniteModelError, Progress, save_epoch
    from utils.optim import build_optimizer, build_scheduler
    args = options.parse_args(options.CIFAR_DEFAULTS, "test", ["--dataset", "fake", "--epochs", "2"])
    model = models.create_model("resnet20_1w1a")
    optimizer = build_optimizer(model.parameters(), args)
    scheduler = build_scheduler(optimizer, args)
    folder = RunFolder(str(tmp_path / "run"), True)
    folder.open("")
    progress = Progress(0, {"top1": 0.0, "top5": 0.0, "epoch": -1}, [])
    val = {"top1": 50.0, "top5": 90.0, "loss": 1.0, "count": 10, "correct": 5}
    train = {"loss": 1.0, "ce": 1.0, "lcr": 0.0, "lcr_share": 0.0, "top1": 40.0, "top5": 80.0, "img_s": 1.0}
    row = progress.add(0, 0.1, 1.0, dict(train), val, None)
    save_epoch(folder, args, model, None, 10, optimizer, scheduler, progress, row)
    before = snapshot(tmp_path / "run")
    with torch.no_grad():
        model.layer1[0].bn1.running_var[3] = float("inf")
    row = progress.add(1, 0.05, 1.0, dict(train), dict(val, top1=60.0), None)
    with pytest.raises(NonFiniteModelError, match="layer1.0.bn1.running_var"):
        save_epoch(folder, args, model, None, 10, optimizer, scheduler, progress, row)
    assert snapshot(tmp_path / "run") == before


@pytest.mark.uses("nan weights")
def test_evaluating_a_non_finite_checkpoint_is_an_error(runs):
    one_error_line(runs["nan weights"], "non-finite", "fc.weight")


def test_export_never_replaces_a_file_it_did_not_write(source, tmp_path, capsys):
    from tools import export
    checkpoint = tmp_path / "checkpoint.pth.tar"
    shutil.copy(source / "checkpoint.pth.tar", checkpoint)
    before = checkpoint.read_bytes()
    assert export.main([str(checkpoint), str(checkpoint)]) == 2
    assert "is also the input" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before
    foreign = tmp_path / "notes.bin"
    foreign.write_bytes(b"someone else's file")
    assert export.main([str(checkpoint), str(foreign)]) == 2
    assert "not written by this tool" in capsys.readouterr().err and foreign.read_bytes() == b"someone else's file"
    packed = tmp_path / "model.packed"
    assert export.main([str(checkpoint), str(packed)]) == 0
    assert export.main([str(checkpoint), str(packed)]) == 0          # its own file: replaced
    assert export.main([str(checkpoint), str(foreign), "--force"]) == 0
    assert export.main([str(checkpoint), str(tmp_path / "missing" / "x" / "out.packed")]) == 2
    assert capsys.readouterr().err.count("error:") == 1


def test_the_ablation_tool_stops_its_trainers_on_sigterm(tmp_path):
    argv = [sys.executable, "-m", "tools.ablate_alpha", "--alphas", "0", "--seeds", "1", "--out", str(tmp_path / "out"),
            "--", *TINY, "--epochs", "50"]
    tool = subprocess.Popen(argv, cwd=REPO_ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    folder = tmp_path / "out" / "runs" / "resnet20_1w1a_irnet_a0_s1"
    deadline = time.monotonic() + 120
    while not (folder / "args.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (folder / "args.json").exists(), tool.communicate(timeout=30)
    tool.send_signal(signal.SIGTERM)
    tool.wait(timeout=60)
    assert tool.returncode != 0
    # no trainer outlives the tool: its lock on the run folder is free at once
    with open(folder / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


# --- crashes that should be one error line -------------------------------------------------------------


@pytest.mark.uses("malformed")
def test_malformed_checkpoints_are_one_error_line(runs):
    resume, evaluate, no_history = runs["malformed"]
    one_error_line(resume, "malformed", "format_version")
    one_error_line(evaluate, "malformed", "format_version")
    one_error_line(no_history, "malformed", "history")


@pytest.mark.parametrize("damage", ["format_version", "args", "epoch", "history", "scheduler", "optimizer",
                                    "state_dict", "model", "num_classes", "best_top1"])
def test_checkpoint_schema_is_validated_key_by_key(damage, source):
    state = torch.load(source / "checkpoint.pth.tar", weights_only=True)
    ckpt.validate(state, "ok", for_resume=True)
    broken = dict(state)
    broken[damage] = [1, 2] if damage == "history" else ["a wrong type"]
    with pytest.raises(ckpt.CheckpointError, match=damage):
        ckpt.validate(broken, "x", for_resume=True)
    del broken[damage]
    with pytest.raises(ckpt.CheckpointError, match=damage):
        ckpt.validate(broken, "x", for_resume=True)


@pytest.mark.uses("unreadable images")
def test_unreadable_images_are_skipped_named_and_counted(runs):
    result = runs["unreadable images"]
    assert_ok(result)
    for name in ("empty.JPEG", "text.JPEG", "truncated.JPEG", "huge.png"):
        assert "skipping unreadable image" in result.stderr and name in result.stderr, (name, explain(result))
    assert "2 of 10 validation images unreadable, not counted" in result.stdout, explain(result)


@pytest.mark.uses("file as results dir")
def test_a_file_where_the_run_folder_should_be_is_one_error_line(runs):
    one_error_line(runs["file as results dir"], "is a file")


def test_a_full_disk_is_one_error_and_the_earlier_checkpoint_stays(source, tmp_path, monkeypatch):
    from utils.runfolder import RunFolder, RunFolderError
    folder = finished_run(source, tmp_path, "run")
    before = snapshot(folder)
    run = RunFolder(str(folder), True)
    state = torch.load(folder / "checkpoint.pth.tar", weights_only=True)

    def full(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RunFolderError, match="No space left on device"):
        run.save(state, is_best=True)
    assert snapshot(folder) == before
    assert not [n for n in os.listdir(folder) if ".tmp" in n]


def test_uneven_shards_never_leave_a_batch_of_one():
    class Sized:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    for length, world, batch in [(9, 2, 4), (11, 3, 6), (5, 2, 4), (33, 1, 32)]:
        args = options.parse_args(options.CIFAR_DEFAULTS, "t", ["--dataset", "fake", "-b", str(batch), "-j", "0"])
        runtime = Runtime(torch.device("cpu"), [], rank=0, world_size=world, distributed=world > 1)
        train, _, _ = build_loaders(Sized(length), Sized(4), args, runtime)
        per_rank, shard = batch // world, math.ceil(length / world)
        sizes = [min(per_rank, shard - i * per_rank) for i in range(len(train))]
        assert 1 not in sizes, (length, world, batch, sizes)
    # the incomplete last batch is dropped (as IR-Net's trainers do) unless it is the only one
    for length, batch, steps in [(1347, 64, 21), (1344, 64, 21), (10, 64, 1)]:
        args = options.parse_args(options.CIFAR_DEFAULTS, "t", ["--dataset", "fake", "-b", str(batch), "-j", "0"])
        train, _, _ = build_loaders(Sized(length), Sized(4), args, Runtime(torch.device("cpu"), []))
        assert len(train) == steps, (length, batch, len(train))
    with pytest.raises(DataError, match="at least 2"):
        build_loaders(Sized(1), Sized(4), options.parse_args(options.CIFAR_DEFAULTS, "t", ["--dataset", "fake"]),
                      Runtime(torch.device("cpu"), []))


@pytest.mark.uses("fail before first epoch")
def test_a_run_that_fails_before_its_first_epoch_leaves_nothing(runs):
    results, result = runs["fail before first epoch"]
    one_error_line(result, "--download")
    assert not (results / "resnet20_1w1a").exists()


@pytest.mark.uses("torchrun error")
def test_under_torchrun_an_error_is_one_line_from_rank_zero(runs):
    result = runs["torchrun error"]
    assert result.returncode != 0
    assert sum(ln.startswith("error: ") for ln in (result.stdout + result.stderr).splitlines()) == 1, explain(result)


# --- security ------------------------------------------------------------------------------------------


class _Marker:
    """An object whose unpickling would create a file: the classic malicious pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_cifar_file_runs_no_code(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "wb") as handle:
        pickle.dump({b"data": _Marker(marker), b"labels": [0]}, handle, protocol=2)
    with pytest.raises(DataError, match="data_batch_1"):
        build_datasets("cifar10", tmp_path)
    assert not marker.exists()


def test_runs_recorded_before_a_flag_existed_compare_with_its_legacy_value():
    # a run recorded before --lcr_surrogate and --precise_bn computed what "ede" and 0 compute now
    from argparse import Namespace

    from utils.checkpoint import changed_run_flags
    saved = {"alpha": 8.0, "seed": 1}
    assert changed_run_flags(saved, Namespace(alpha=8.0, seed=1, lcr_surrogate="ede", precise_bn=0)) == []
    assert changed_run_flags(saved, Namespace(alpha=8.0, seed=1, lcr_surrogate="tanh", precise_bn=0)) == \
        ["--lcr_surrogate 'ede' -> 'tanh'"]
    from tools.ablate_alpha import differences
    assert differences(saved, {"alpha": 8.0, "lcr_surrogate": "tanh", "precise_bn": 100}) == \
        ["--lcr_surrogate 'ede' -> 'tanh'", "--precise_bn 0 -> 100"]
    # the flags new since then have legacy values too
    assert differences(saved, {"lcr_sigma_f": "differentiable"}) == ["--lcr_sigma_f 'detached' -> 'differentiable'"]


def test_the_ablation_baseline_ignores_the_regulariser_flags():
    # an alpha-0 run builds no regulariser: a grid that changes only the paper form's flags reuses its
    # IR-Net runs, but every other flag still counts
    from tools.ablate_alpha import differences
    saved = {"alpha": 0.0, "lcr_surrogate": "tanh", "lcr_sigma_f": "detached", "epochs": 30}
    grid = {"alpha": 0.0, "lcr_surrogate": "ede", "lcr_sigma_f": "differentiable", "epochs": 30}
    assert differences(saved, grid, baseline=True) == []
    assert len(differences(saved, grid)) == 2
    assert differences(saved, {**grid, "epochs": 15}, baseline=True) == ["--epochs 30 -> 15"]
