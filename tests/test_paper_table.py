"""``tools/paper_table.py`` on run folders written here: published numbers of PAPER.md beside ours,
alpha 0 in the IR-Net columns, alpha > 0 in the LCR-BNN columns, unfinished runs marked."""
import csv
import json
import statistics
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, explain, script_env
from tools import paper_table


def write_run(root, name, dataset, model, alpha, top1, top5, epochs, variant="paper"):
    """A run folder: args.json and a summary.csv row per epoch (``val_top1``, ``val_top5``, best so far)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(
        {"dataset": dataset, "model": model, "alpha": alpha, "lcr_variant": variant, "epochs": epochs}))
    with open(folder / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "val_top1", "val_top5", "best_top1", "best_top5"])
        best = (-1.0, -1.0)
        for epoch, (a1, a5) in enumerate(zip(top1, top5)):
            if a1 > best[0]:
                best = (a1, a5)
            writer.writerow([epoch, a1, a5, *best])
    return folder


def table(text):
    """The Markdown table in ``text`` as a list of {column: cell} dicts."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "results"
    write_run(root, "resnet20_1w1a_a8", "cifar10", "resnet20_1w1a", 8.0, [40.0, 85.25, 84.5], [90, 99, 99], 3)
    write_run(root, "resnet20_1w1a_a0", "cifar10", "resnet20_1w1a", 0.0, [35.0, 80.5, 81.0], [90, 98, 99], 3)
    write_run(root, "resnet18_a8_s1", "cifar10", "resnet18_1w1a", 8.0, [50.0, 90.0], [95, 99], 400)
    write_run(root, "resnet18_a8_s2", "cifar10", "resnet18_1w1a", 8.0, [52.0, 91.0], [95, 99], 400)
    write_run(root / "imagenet", "resnet18_IR_a8", "imagenet", "resnet18_1w1a_IR", 8.0,
              [20.0, 30.5], [40.0, 55.25], 100, variant="official")
    write_run(root, "digits_a4", "digits", "resnet20_1w1a", 4.0, [70.0], [95.0], 1)
    return root


def test_published_numbers_beside_ours(runs, capsys):
    assert paper_table.main(["--runs", str(runs)]) == 0
    rows = table(capsys.readouterr().out)
    by_row = {r["paper row"]: r for r in rows}

    r20 = by_row["CIFAR-10 ResNet-20 (Bi-Real blocks)"]
    assert r20["published IR-Net"] == "86.5" and r20["published LCR-BNN"] == "not published here"
    assert (r20["ours LCR-BNN best"], r20["ours LCR-BNN last"]) == ("85.25", "84.50")
    assert (r20["ours IR-Net best"], r20["ours IR-Net last"]) == ("81.00", "81.00")  # alpha 0 -> IR-Net
    assert "alpha 8, paper form" in r20["notes"] and "fewer epochs than the recipe's 400" in r20["notes"]
    assert r20["epochs run / set (recipe)"] == "LCR 3/3, IR-Net 3/3 (400)"
    assert r20["published source"] == "IR-Net README; RBNN paper"

    r18 = by_row["CIFAR-10 ResNet-18"]
    assert (r18["published LCR-BNN"], r18["published IR-Net"]) == ("91.8", "91.5")
    hand = f"{statistics.fmean([90.0, 91.0]):.2f} ± {statistics.stdev([90.0, 91.0]):.2f} (n=2)"
    assert r18["ours LCR-BNN best"] == hand == "90.50 ± 0.71 (n=2)"
    assert r18["ours IR-Net best"] == "–"
    assert "unfinished: resnet18_a8_s1 2/400 epochs" in r18["notes"]

    imagenet = by_row["ImageNet ResNet-18"]
    assert (imagenet["published LCR-BNN"], imagenet["published IR-Net"]) == ("59.6 / 81.6", "58.1 / 80.0")
    assert imagenet["ours LCR-BNN best"] == "30.50 / 55.25" and imagenet["ours IR-Net best"] == "–"
    assert "official form" in imagenet["notes"] and "unfinished" in imagenet["notes"]

    digits = by_row["digits resnet20_1w1a"]
    assert digits["published LCR-BNN"] == "–" and digits["ours LCR-BNN best"] == "70.00"
    assert "no published row" in digits["notes"]
    assert "ImageNet ResNet-34" not in by_row  # no run, and no --all


def test_all_lists_every_paper_row(runs, capsys):
    paper_table.main(["--runs", str(runs / "resnet20_1w1a_a0"), "--all"])
    by_row = {r["paper row"]: r for r in table(capsys.readouterr().out)}
    assert [r["row"] for r in paper_table.PAPER_ROWS] == list(by_row)
    assert by_row["ImageNet ResNet-34"]["published LCR-BNN"] == "63.5 / –"
    assert by_row["ImageNet ResNet-34"]["notes"] == "not run"
    assert "not implemented" in by_row["CIFAR-10 ResNet-20 W1A32"]["notes"]
    assert by_row["CIFAR-10 ResNet-20 W1A32"]["published IR-Net"] == "90.8"
    r20 = by_row["CIFAR-10 ResNet-20 (Bi-Real blocks)"]
    assert r20["ours IR-Net best"] == "81.00" and r20["ours LCR-BNN best"] == "–"


def test_runs_as_a_module_from_the_repository_root(runs):
    result = subprocess.run([sys.executable, "-m", "tools.paper_table", "--runs", str(runs)], cwd=REPO_ROOT,
                            env=script_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, explain(result)
    assert "| CIFAR-10 ResNet-18 | 91.8 |" in result.stdout


def test_missing_folder_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        paper_table.main(["--runs", str(tmp_path / "nowhere")])
    assert info.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paper_table.main(["--runs", str(tmp_path)])
    assert "no run folder" in capsys.readouterr().err
