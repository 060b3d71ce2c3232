"""Bad input to the training scripts: each run stops with a non-zero status and one last stderr line.

That line is ``error: ...`` (the scripts' own checks, status 1) or argparse's ``main.py: error: ...``
after its usage text (status 2); it names the offending value, and no traceback comes with it. Runs
that meet an existing run folder leave its files as they were. The scripts run in subprocesses as a
user types them, two at a time in the background from the start of the module.
"""
import re
import shutil

import pytest
import torch

from conftest import (CIFAR_MAIN, COMMON_FLAGS, FAKE_FLAGS, IMAGENET_MAIN, Background, assert_ok, explain,
                      kill_after_first_checkpoint, run_main, selected_uses, start_main, write_image_folder)

ARGPARSE, OWN = "argparse", "own"
TINY_FAKE = ("--dataset", "fake", "--fake_size", "32,16", "-b", "16")
NO_LIP = ("--lip_images", "0")  # no per-epoch Lipschitz estimate: nothing here reads it
RUN_FILES_KEPT = ("checkpoint.pth.tar", "model_best.pth.tar", "summary.csv", "args.json")


def check_error(result, kind, *mentions):
    """``result`` failed as a user should see it: the status of ``kind`` and a last stderr line that
    is the error message and names every one of ``mentions``; returns that line."""
    assert result.returncode == (2 if kind == ARGPARSE else 1), explain(result)
    assert "Traceback" not in result.stderr + result.stdout, explain(result)
    last = result.stderr.rstrip("\n").splitlines()[-1]
    if kind == ARGPARSE:
        assert result.stderr.startswith("usage: "), explain(result)
        assert re.match(r"main\.py: error: ", last), explain(result)
    else:
        assert last.startswith("error: "), explain(result)
    for mention in mentions:
        assert str(mention) in last, f"{mention!r} not named in the error line\n{explain(result)}"
    return last


def _data_and_flag_cases(tmp):
    """name -> (script, flags, kind, what the error line must name) for cases without a checkpoint."""
    (tmp / "empty").mkdir()
    write_image_folder(tmp / "no_val", {"train": ["n01", "n02"]}, images_per_class=1)
    fake = (*TINY_FAKE, *COMMON_FLAGS, "--epochs", "1", "--results_dir", tmp / "results")
    cifar10 = ("--dataset", "cifar10", "-b", "16", *COMMON_FLAGS, "--results_dir", tmp / "results")
    return {
        "cifar10 folder missing": (CIFAR_MAIN, (*cifar10, "--data_path", tmp / "nowhere"), OWN,
                                   (tmp / "nowhere" / "cifar-10-batches-py", "--download")),
        "cifar10 folder empty": (CIFAR_MAIN, (*cifar10, "--data_path", tmp / "empty"), OWN,
                                 (tmp / "empty" / "cifar-10-batches-py", "--download")),
        "imagenet without val": (IMAGENET_MAIN, ("--data_path", tmp / "no_val", "-b", "4", *COMMON_FLAGS,
                                                 "--results_dir", tmp / "results"), OWN, (tmp / "no_val" / "val",)),
        "unknown model": (CIFAR_MAIN, (*fake, "-a", "resnet99_1w1a"), ARGPARSE, ("--model", "resnet99_1w1a")),
        "unknown dataset": (CIFAR_MAIN, (*fake, "--dataset", "mnist"), ARGPARSE, ("--dataset", "mnist")),
        "batch size 0": (CIFAR_MAIN, (*fake, "-b", "0"), ARGPARSE, ("--batch_size", "0")),
        "epochs 0": (CIFAR_MAIN, (*fake, "--epochs", "0"), ARGPARSE, ("--epochs", "0")),
        "negative alpha": (CIFAR_MAIN, (*fake, "--alpha", "-1"), ARGPARSE, ("--alpha", "-1")),
        "gpus not numbers": (CIFAR_MAIN, (*fake, "--gpus", "abc"), OWN, ("--gpus", "abc")),
        "resume with nothing to resume": (CIFAR_MAIN, (*fake, "--save", "_new", "--resume"), OWN,
                                          (tmp / "results" / "resnet20_1w1a_new" / "checkpoint.pth.tar", "--resume")),
        "huge learning rate": (CIFAR_MAIN, (*fake, "--epochs", "2", "--lr", "1e30", "--save", "_lr"), OWN,
                               ("loss is", "epoch 0 iteration")),
    }


def _checkpoint_cases(tmp, checkpoint):
    """Like :func:`_data_and_flag_cases`, for ``-e`` of broken or foreign files made from ``checkpoint``."""
    garbage = tmp / "garbage.pth.tar"
    garbage.write_bytes(b"\x80\x04 this is not a checkpoint " * 50)
    whole = checkpoint.read_bytes()
    truncated = tmp / "truncated.pth.tar"
    truncated.write_bytes(whole[:len(whole) // 2])
    # The fake set has 10 classes; a CIFAR-100 checkpoint has a 100-wide classifier.
    state = torch.load(checkpoint, weights_only=True)
    state["num_classes"] = 100
    state["state_dict"]["fc.weight"] = torch.zeros(100, state["state_dict"]["fc.weight"].shape[1])
    state["state_dict"]["fc.bias"] = torch.zeros(100)
    other_classes = tmp / "cifar100_like.pth.tar"
    torch.save(state, other_classes)
    fake = (*TINY_FAKE, *COMMON_FLAGS, "--results_dir", tmp / "results")
    return {
        "evaluate garbage bytes": (CIFAR_MAIN, (*fake, "-e", garbage), OWN, (garbage, "corrupt")),
        "evaluate truncated checkpoint": (CIFAR_MAIN, (*fake, "-e", truncated), OWN, (truncated, "truncated")),
        "evaluate another model": (CIFAR_MAIN, (*fake, "-a", "vgg_small_1w1a", "-e", checkpoint), OWN,
                                   (checkpoint, "resnet20_1w1a", "vgg_small_1w1a")),
        "evaluate another number of classes": (CIFAR_MAIN, (*fake, "-e", other_classes), OWN,
                                               (other_classes, "100 classes", "dataset has 10")),
    }


CHECKPOINT_CASES = ["evaluate garbage bytes", "evaluate truncated checkpoint", "evaluate another model",
                    "evaluate another number of classes"]
CASES = ["cifar10 folder missing", "cifar10 folder empty", "imagenet without val", "unknown model",
         "unknown dataset", "batch size 0", "epochs 0", "negative alpha", "gpus not numbers",
         "resume with nothing to resume", "huge learning rate", *CHECKPOINT_CASES]


def _run_case(case):
    script, flags, kind, mentions = case
    return run_main(script, *flags), kind, mentions


def _resume_a_killed_run(results):
    """Kill a fake run after its first checkpoint, scale its classifier to 1e38 (finite, but the logits
    overflow), then resume it; returns the resumed run's result, the run folder and the bytes of the
    checkpoint it resumed from."""
    started = (*FAKE_FLAGS, *COMMON_FLAGS, *NO_LIP, "--epochs", "5", "--results_dir", results)
    folder = results / "resnet20_1w1a"
    kill_after_first_checkpoint(start_main(CIFAR_MAIN, *started), folder / "checkpoint.pth.tar")
    state = torch.load(folder / "checkpoint.pth.tar", weights_only=True)
    state["state_dict"]["fc.weight"] *= 1e38
    torch.save(state, folder / "checkpoint.pth.tar")
    before = (folder / "checkpoint.pth.tar").read_bytes()
    return run_main(CIFAR_MAIN, *started, "--resume"), folder, before


def _run_on_a_copy(source, results, *flags):
    """Copy the run folder ``source`` under ``results`` and run cifar/main.py ``flags`` into it;
    returns the result, the copy and the bytes of its files before the run."""
    folder = results / source.name
    shutil.copytree(source, folder)
    before = {name: (folder / name).read_bytes() for name in RUN_FILES_KEPT}
    return run_main(CIFAR_MAIN, *flags, "--results_dir", results), folder, before


@pytest.fixture(scope="module", autouse=True)
def runs(request, tmp_path_factory):
    """Every run of this module by name, started with the module; only the selected tests' runs."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    background = Background(selected_uses(request))
    # A resumed run keeps all its flags, so weights that overflow the logits (written into its
    # checkpoint) are what makes the first loss of the resumed epoch infinite.
    background.submit("non-finite loss", _resume_a_killed_run, tmp / "non_finite")
    background.submit("gpus without gpu", run_main, CIFAR_MAIN, *TINY_FAKE, "--gpus", "3", "-j", "0", "-p", "1",
                      *NO_LIP, "--epochs", "1", "--results_dir", tmp / "gpus")
    for name, case in _data_and_flag_cases(tmp).items():
        background.submit(name, _run_case, case)
    # the runs below need the shared fake run's folder, made meanwhile
    if background.wanted & {"refuse a run folder", *CHECKPOINT_CASES}:
        source = request.getfixturevalue("fake_cifar_run")["folder"]
        for name, case in _checkpoint_cases(tmp, source / "checkpoint.pth.tar").items():
            background.submit(name, _run_case, case)
        background.submit("refuse a run folder", _run_on_a_copy, source, tmp / "refuse", *FAKE_FLAGS,
                          *COMMON_FLAGS, "--epochs", "2", "--alpha", "8", "--save", "_a8")
    yield background
    background.close()


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.uses(name)) for name in CASES])
def test_bad_input_ends_with_one_error_line(runs, name):
    result, kind, mentions = runs[name]
    check_error(result, kind, *mentions)


@pytest.mark.uses("gpus without gpu")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without a GPU")
def test_gpu_flag_without_gpu_falls_back_to_cpu(runs):
    result = runs["gpus without gpu"]
    assert_ok(result)
    notices = [line for line in result.stdout.splitlines() if "no GPU" in line]
    assert len(notices) == 1 and "running on CPU" in notices[0] and "--gpus 3" in notices[0], result.stdout
    assert "device cpu" in result.stdout


@pytest.mark.uses("refuse a run folder")
def test_fresh_run_refuses_a_folder_that_holds_a_run(runs):
    result, folder, before = runs["refuse a run folder"]
    check_error(result, OWN, folder, "--resume")
    for name, content in before.items():
        assert (folder / name).read_bytes() == content, f"{name} changed"


@pytest.mark.uses("non-finite loss")
def test_non_finite_loss_stops_with_epoch_and_iteration_and_keeps_the_last_checkpoint(runs):
    result, folder, before = runs["non-finite loss"]
    epochs_done = torch.load(folder / "checkpoint.pth.tar", weights_only=True)["epoch"]
    assert epochs_done >= 1
    last = check_error(result, OWN, f"epoch {epochs_done} iteration 0")
    assert re.search(r"loss is (nan|inf|-inf) ", last), last
    assert (folder / "checkpoint.pth.tar").read_bytes() == before
