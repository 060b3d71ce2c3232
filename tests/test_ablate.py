"""``tools/ablate_alpha.py``: the grid runs, finished runs are skipped, interrupted ones resumed, and
the table's means and standard deviations match a hand computation from ``ablation.csv``.

Real runs use ``cifar/main.py`` on a tiny synthetic set (one OpenMP thread each); the table and
failure tests use run folders written here and stand-in commands, so they start no training.
"""
import contextlib
import csv
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest
import torch

from conftest import REPO_ROOT, explain, script_env
from tools import ablate_alpha

SCRIPT_FLAGS = ["--dataset", "fake", "--fake_size", "64,32", "-b", "32", "-j", "0", "-p", "100",
                "--lip_images", "0", "--model", "resnet20_1w1a", "--gpus", "cpu"]
MODEL = "resnet20_1w1a"
TOOL_TIMEOUT_S = 300
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def md_rows(path):
    """The ablation table of ``ablation.md`` as {(form label, alpha): [cells]}."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "form":
            rows[(cells[0], cells[1])] = cells
    return rows


def file_times(folder):
    """{relative path: (mtime_ns, size)} of every file under ``folder``."""
    times = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            times[os.path.relpath(path, folder)] = (stat.st_mtime_ns, stat.st_size)
    return times


def tool_in_process(argv):
    """``ablate_alpha.main(argv)`` with the scripts' test environment; returns (exit status, stdout)."""
    stdout = io.StringIO()
    with mock.patch.dict(os.environ, script_env()), contextlib.redirect_stdout(stdout):
        code = ablate_alpha.main([str(a) for a in argv])
    return code, stdout.getvalue()


class KilledSweep:
    """In a background thread: ``python -m tools.ablate_alpha`` (one run of 2 epochs), SIGKILLed with
    the training script it started as soon as the first epoch's checkpoint exists, then the same
    command again, which must resume that run. Runs while the grid fixture trains, to save time."""

    def __init__(self, out):
        self.out = out
        self.argv = [sys.executable, "-m", "tools.ablate_alpha", "--alphas", "8", "--seeds", "1",
                     "--forms", "paper", "--out", str(out), "--", *SCRIPT_FLAGS, "--epochs", "2"]
        self.folder = out / "runs" / f"{MODEL}_paper_a8_s1"
        self.epochs_at_kill, self.resumed = None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        checkpoint = self.folder / "checkpoint.pth.tar"
        proc = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=script_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + TOOL_TIMEOUT_S
        while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the tool and its script only
        proc.wait()
        if checkpoint.exists():
            self.epochs_at_kill = torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"]
            self.resumed = subprocess.run(self.argv, cwd=REPO_ROOT, env=script_env(), capture_output=True,
                                          text=True, timeout=TOOL_TIMEOUT_S)

    def wait(self):
        self.thread.join(TOOL_TIMEOUT_S)


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """alphas 0 and 8, one seed, paper form, one epoch each, two runs at a time; meanwhile the sweep
    that :func:`test_interrupted_run_is_resumed` resumes is started and killed (it overlaps to save time)."""
    killed = KilledSweep(tmp_path_factory.mktemp("killed"))
    out = tmp_path_factory.mktemp("ablation")
    argv = ["--script", "cifar", "--alphas", "0", "8", "--seeds", "1", "--forms", "paper", "--jobs", "2",
            "--out", out, "--", *SCRIPT_FLAGS, "--epochs", "1"]
    code, stdout = tool_in_process(argv)
    logs = {name: (out / "logs" / name).read_text() for name in os.listdir(out / "logs")}
    assert code == 0, stdout + "\n".join(f"--- {k}\n{v[-2000:]}" for k, v in logs.items())
    yield {"out": out, "argv": argv, "stdout": stdout, "killed": killed}
    killed.wait()


def test_grid_writes_runs_csv_table_and_plot(grid_run):
    out = grid_run["out"]
    assert sorted(os.listdir(out / "runs")) == [f"{MODEL}_irnet_a0_s1", f"{MODEL}_paper_a8_s1"]
    for name in os.listdir(out / "runs"):
        args = json.loads((out / "runs" / name / "args.json").read_text())
        assert args["epochs"] == 1 and args["seed"] == 1 and args["dataset"] == "fake"
        assert args["alpha"] == (0.0 if "a0" in name else 8.0)
    records = read_csv(out / "ablation.csv")
    assert list(records[0]) == list(ablate_alpha.CSV_FIELDS)
    assert [(r["form"], float(r["alpha"]), r["status"]) for r in records] == [
        ("irnet", 0.0, "finished"), ("paper", 8.0, "finished")]
    for r in records:
        summary = read_csv(out / r["run_folder"] / "summary.csv")
        assert float(r["last_top1"]) == float(summary[-1]["val_top1"])
        assert float(r["best_top1"]) == max(float(s["val_top1"]) for s in summary)
        assert float(r["lcr_share"]) == pytest.approx(float(summary[0]["train_lcr_share"]))
    assert float(records[0]["lcr_share"]) == 0.0 and float(records[1]["lcr_share"]) > 0.0
    rows = md_rows(out / "ablation.md")
    assert set(rows) == {("IR-Net (alpha 0, shared)", "0"), ("paper", "8")}
    assert (out / "ablation.png").read_bytes()[:8] == PNG_MAGIC
    assert "2 started, 0 failed" in grid_run["stdout"]


def test_rerun_skips_finished_runs(grid_run):
    out = grid_run["out"]
    before = {**file_times(out / "runs"), **{"logs/" + k: v for k, v in file_times(out / "logs").items()}}
    code, stdout = tool_in_process(grid_run["argv"])
    assert code == 0, stdout
    after = {**file_times(out / "runs"), **{"logs/" + k: v for k, v in file_times(out / "logs").items()}}
    assert after == before  # no run touched its folder, no log was appended to
    assert stdout.count("[finished]") == 2 and "started " not in stdout
    assert "2 skipped (finished), 0 resumed, 0 started, 0 failed" in stdout


def test_interrupted_run_is_resumed(grid_run):
    """The sweep killed after its first epoch (:class:`KilledSweep`) is resumed to the end."""
    killed = grid_run["killed"]
    killed.wait()
    assert killed.epochs_at_kill == 1, "no checkpoint, or the run finished before it could be interrupted"
    result = killed.resumed
    assert result.returncode == 0, explain(result)
    assert f"[interrupted] {MODEL}_paper_a8_s1:" in result.stdout
    assert "1 resumed, 0 started, 0 failed" in result.stdout
    checkpoint = killed.folder / "checkpoint.pth.tar"
    assert f"resumed from {checkpoint}" in (killed.folder / "log.txt").read_text()
    assert [int(r["epoch"]) for r in read_csv(killed.folder / "summary.csv")] == [0, 1]
    assert read_csv(killed.out / "ablation.csv")[0]["status"] == "finished"


# --- without training: run folders written here ------------------------------------------------------


def write_run(runs_dir, save, alpha, seed, variant, top1, shares, epochs=3):
    """A run folder as the trainer leaves it: args.json, a summary.csv row per value of ``top1`` and a
    checkpoint (empty here: only its presence is read)."""
    folder = runs_dir / f"{MODEL}{save}"
    folder.mkdir(parents=True)
    args = {"alpha": alpha, "seed": seed, "epochs": epochs, "dataset": "fake", "model": MODEL,
            "lcr_variant": variant, "batch_size": 32, "lcr_surrogate": "tanh", "precise_bn": 0,
            "lcr_sigma_f": "differentiable"}
    (folder / "args.json").write_text(json.dumps(args))
    with open(folder / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "train_lcr_share", "val_top1", "val_top5", "best_top1", "best_top5"])
        for epoch, (acc, share) in enumerate(zip(top1, shares)):
            best = max(top1[:epoch + 1])
            writer.writerow([epoch, share, acc, acc + 10, best, best + 10])
    (folder / "checkpoint.pth.tar").write_bytes(b"")
    return folder


HAND_ARGV = ["--alphas", "0", "4", "--seeds", "1", "2", "--forms", "paper", "official", "--", "--dataset",
             "fake", "--epochs", "3", "-b", "32"]


def test_table_mean_and_std_match_the_csv(tmp_path, capsys):
    runs = tmp_path / "runs"
    accuracy = {("irnet", 1): [10.0, 30.5, 20.25], ("irnet", 2): [12.0, 33.0, 31.0],
                ("paper", 1): [15.5, 40.0, 41.75], ("paper", 2): [11.0, 37.25, 36.0],
                ("official", 1): [9.0, 28.0, 35.5], ("official", 2): [14.0, 22.0]}
    for (form, seed), top1 in accuracy.items():
        alpha = 0 if form == "irnet" else 4
        shares = [0.0] * 3 if alpha == 0 else [0.05 * seed, 0.02, 0.01]
        write_run(runs, f"_{form}_a{alpha}_s{seed}", float(alpha), seed, "paper" if form == "irnet" else form,
                  top1, shares[:len(top1)])
    code = ablate_alpha.main(["--table_only", "--out", str(tmp_path), *HAND_ARGV])
    assert code == 0, capsys.readouterr().out

    records = read_csv(tmp_path / "ablation.csv")
    assert len(records) == 6
    status = {(r["form"], int(r["seed"])): r["status"] for r in records}
    assert status.pop(("official", 2)) == "unfinished" and set(status.values()) == {"finished"}
    paper_s1 = next(r for r in records if (r["form"], r["seed"]) == ("paper", "1"))
    assert float(paper_s1["lcr_share"]) == pytest.approx((0.05 + 0.02 + 0.01) / 3)
    assert float(paper_s1["best_top1"]) == 41.75 and float(paper_s1["last_top1"]) == 41.75

    rows = md_rows(tmp_path / "ablation.md")
    labels = {"irnet": "IR-Net (alpha 0, shared)", "paper": "paper", "official": "official"}
    for form, alpha in (("irnet", "0"), ("paper", "4"), ("official", "4")):
        done = [r for r in records if r["form"] == form and r["status"] == "finished"]
        cells = rows[(labels[form], alpha)]
        for column, key in ((2, "best_top1"), (3, "last_top1")):
            values = [float(r[key]) for r in done]
            expected = (f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1
                        else f"{values[0]:.2f}")
            assert cells[column] == expected, (form, key, cells)
        share = statistics.fmean(float(r["lcr_share"]) for r in done)
        assert cells[10] == f"{100 * share:.3g}"
        assert cells[11].startswith(str(len(done)))
    assert rows[("IR-Net (alpha 0, shared)", "0")][2] == "31.75 ± 1.77"  # best 30.5 and 33.0: 2.5 / sqrt(2)
    text = (tmp_path / "ablation.md").read_text()
    assert f"{MODEL}_official_a4_s2" in text and "(2/3 epochs)" in text
    assert (tmp_path / "ablation.png").read_bytes()[:8] == PNG_MAGIC


def test_conflicting_run_folder_is_reported_and_left_alone(tmp_path, capsys):
    folder = write_run(tmp_path / "runs", "_paper_a4_s1", 4.0, 1, "paper", [10.0] * 5, [0.1] * 5, epochs=5)
    before = file_times(folder)
    code = ablate_alpha.main(["--alphas", "4", "--seeds", "1", "--out", str(tmp_path), "--",
                              "--dataset", "fake", "--epochs", "3"])
    captured = capsys.readouterr()
    assert code == 1
    assert "[conflict]" in captured.out and "--epochs 5 -> 3" in captured.out
    assert "failed" in captured.err and file_times(folder) == before


def test_dry_run_prints_commands_and_starts_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code = ablate_alpha.main(["--alphas", "0", "8", "--seeds", "1", "2", "--forms", "paper", "official",
                              "--out", str(out), "--dry_run", "--", "--dataset", "digits", "--epochs", "15",
                              "--fp_weights", "fp.pth.tar"])
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    commands = [line.strip() for line in text.splitlines() if "main.py" in line]
    assert len(commands) == 6
    for line in commands:
        assert "--dataset digits --epochs 15 --fp_weights fp.pth.tar" in line
        save = re.search(r"--save (\S+)", line).group(1)
        form = save.split("_")[1]
        assert ("--lcr_variant" in line) == (form != "irnet")
        if form != "irnet":
            assert line.endswith(f"--lcr_variant {form}")
    assert sum("--alpha 0 " in line for line in commands) == 2  # once per seed, not per form
    assert "RANDOM" not in text


def test_official_alphas_limit_the_official_form(tmp_path, capsys):
    out = tmp_path / "out"
    code = ablate_alpha.main(["--alphas", "0", "1", "8", "--official_alphas", "8", "--seeds", "1", "--forms",
                              "paper", "official", "--out", str(out), "--dry_run", "--", "--dataset", "digits"])
    names = sorted(re.search(r"--save _(\S+)", line).group(1)
                   for line in capsys.readouterr().out.splitlines() if "main.py" in line)
    assert code == 0 and names == ["irnet_a0_s1", "official_a8_s1", "paper_a1_s1", "paper_a8_s1"]
    for bad in (["--official_alphas", "nan", "--forms", "official"], ["--official_alphas", "8"]):
        with pytest.raises(SystemExit):
            ablate_alpha.main([*bad, "--out", str(out), "--dry_run"])


def test_flags_the_tool_sets_cannot_be_passed_through(tmp_path):
    with pytest.raises(SystemExit) as info:
        ablate_alpha.main(["--out", str(tmp_path), "--", "--dataset", "fake", "--alph", "3"])
    assert "--alpha" in str(info.value.code)


def test_failed_runs_are_reported_and_the_rest_go_on(tmp_path, monkeypatch, capsys):
    fail = "import sys; sys.stderr.write('Traceback ...\\nerror: no data here\\n'); sys.exit(3)"
    monkeypatch.setattr(ablate_alpha, "command", lambda script, run: (
        [sys.executable, "-c", fail] if run.alpha == 8 else [sys.executable, "-c", "print('ok')"]))
    code = ablate_alpha.main(["--alphas", "4", "8", "--seeds", "1", "--jobs", "2", "--out", str(tmp_path),
                              "--", "--dataset", "fake", "--epochs", "1"])
    captured = capsys.readouterr()
    assert code == 1
    assert f"FAILED   {MODEL}_paper_a8_s1: exit status 3: error: no data here" in captured.out
    # the alpha-4 stand-in exits 0 without training: reported too, as a run that did not finish
    assert f"{MODEL}_paper_a4_s1: exited 0 but summary.csv has 0 of 1 epochs" in captured.out
    assert "2 failed" in captured.out


def test_execute_spreads_runs_over_devices(tmp_path):
    show = [sys.executable, "-c", "import sys; print(' '.join(sys.argv[1:]))"]
    results = ablate_alpha.execute([("a", show), ("b", show), ("c", show)], 2, tmp_path, devices=["5", "7"],
                                   report=lambda line: None)
    assert {name: r[0] for name, r in results.items()} == {"a": 0, "b": 0, "c": 0}
    assert (tmp_path / "a.out").read_text().strip() == "--gpus 5"
    assert (tmp_path / "b.out").read_text().strip() == "--gpus 7"
    assert (tmp_path / "c.out").read_text().strip() in ("--gpus 5", "--gpus 7")


def _corruption_json(folder, kind, errors, clean_error):
    """A digits-C result file as tools.eval_corruptions writes it (only what the study reads)."""
    name = {"last": "checkpoint", "best": "model_best"}[kind] + "_corruptions_digits.json"
    table = {c: {"error": e, "accuracy": [100.0 - x for x in e]} for c, e in errors.items()}
    mean = statistics.fmean(100.0 - statistics.fmean(e) for e in errors.values())
    (folder / name).write_text(json.dumps({"format": "lcr-bnn-corruptions", "corruptions": table,
                                           "clean_error": clean_error, "mean_accuracy": mean}))


def test_digits_c_columns_hold_mean_accuracy_and_relative_mce_against_the_same_seed(tmp_path, capsys):
    runs = tmp_path / "runs"
    # per seed: IR-Net and paper runs with hand-made digits-C results
    errors = {("irnet", 1): ({"a": [10, 20, 30, 40, 50], "b": [5, 5, 5, 5, 5]}, 4.0),
              ("paper", 1): ({"a": [8, 16, 24, 32, 40], "b": [4, 4, 4, 4, 4]}, 4.0),
              ("irnet", 2): ({"a": [12, 22, 32, 42, 52], "b": [6, 6, 6, 6, 6]}, 2.0),
              ("paper", 2): ({"a": [12, 22, 32, 42, 52], "b": [6, 6, 6, 6, 6]}, 2.0)}
    for (form, seed), (err, clean) in errors.items():
        alpha = 0 if form == "irnet" else 4
        folder = write_run(runs, f"_{form}_a{alpha}_s{seed}", float(alpha), seed, "paper", [50.0, 60.0, 70.0],
                           [0.0, 0.0, 0.0])
        for kind in ("last", "best"):
            _corruption_json(folder, kind, err, clean)
    argv = ["--table_only", "--digits_c", "--out", str(tmp_path), "--alphas", "0", "4", "--seeds", "1", "2",
            "--", "--dataset", "fake", "--epochs", "3", "-b", "32"]
    assert ablate_alpha.main(argv) == 0, capsys.readouterr().out
    records = {(r["form"], int(r["seed"])): r for r in read_csv(tmp_path / "ablation.csv")}
    # seed 1: relative CE of a = (120 - 5 * 4) / (150 - 5 * 4) = 100/130, of b = 0 / 5 -> mean of the two
    assert float(records[("paper", 1)]["rel_mce_last"]) == pytest.approx(100 * (100 / 130 + 0 / 5) / 2)
    assert float(records[("irnet", 2)]["rel_mce_best"]) == pytest.approx(100.0)
    assert float(records[("paper", 2)]["rel_mce_best"]) == pytest.approx(100.0)   # same errors as its IR-Net
    assert float(records[("paper", 1)]["mca_last"]) == pytest.approx(100 - (24 + 4) / 2)
    row = md_rows(tmp_path / "ablation.md")[("paper", "4")]
    mca = [100 - (24 + 4) / 2, 100 - (32 + 6) / 2]            # seeds 1 and 2
    assert row[4] == f"{statistics.fmean(mca):.2f} ± {statistics.stdev(mca):.2f}"
    assert (tmp_path / "ablation.png").read_bytes()[:8] == PNG_MAGIC
