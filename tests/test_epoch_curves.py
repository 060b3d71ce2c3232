"""tools.epoch_curves: per-epoch means over groups of run folders."""
import csv

import pytest

from tools import epoch_curves


def write_run(folder, values):
    folder.mkdir(parents=True)
    with open(folder / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "train_grad_norm", "val_top1"])
        writer.writeheader()
        for epoch, (g, top1) in enumerate(values):
            writer.writerow({"epoch": epoch, "train_grad_norm": g, "val_top1": top1})


def test_means_per_epoch_and_group(tmp_path, capsys):
    write_run(tmp_path / "a" / "s1", [(1.0, 50.0), (3.0, 70.0)])
    write_run(tmp_path / "a" / "s2", [(2.0, 60.0)])                 # stopped after one epoch
    write_run(tmp_path / "b" / "s1", [(10.0, 20.0), (30.0, 40.0)])
    code = epoch_curves.main(["--group", f"A={tmp_path}/a/*", "--group", f"B={tmp_path}/b/*",
                              "--columns", "train_grad_norm", "val_top1"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0] == ("| epoch | train_grad_norm (A, n=2) | train_grad_norm (B, n=1) | val_top1 (A, n=2) "
                        "| val_top1 (B, n=1) |")
    assert lines[2] == "| 0 | 1.5 | 10 | 55 | 20 |"
    assert lines[3] == "| 1 | 3 | 30 | 70 | 40 |"


def test_bad_groups_and_columns_are_one_error_line(tmp_path, capsys):
    write_run(tmp_path / "a", [(1.0, 50.0)])
    for argv in (["--group", "nolabel"], ["--group", f"x={tmp_path}/missing*"],
                 ["--group", f"x={tmp_path}/a", "--columns", "no_such_column"]):
        with pytest.raises(SystemExit) as exit_info:
            epoch_curves.main(argv)
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
