"""tools/bench_loader.py times the DataLoader and --gpu_data paths over the same CIFAR training set."""
import pytest

from conftest import write_cifar10
from tools import bench_loader


def test_both_paths_see_the_whole_training_set(tmp_path, capsys):
    write_cifar10(tmp_path, n_per_batch=6)                      # 30 training images
    rows = bench_loader.main(["--data_path", str(tmp_path), "--device", "cpu", "-b", "8", "-j", "0", "1",
                              "--rounds", "1"])
    assert [(r["path"], r["workers"]) for r in rows] == [("DataLoader", 0), ("DataLoader", 1), ("--gpu_data", "-")]
    assert all(r["images"] == 24 for r in rows)       # 3 full batches; the incomplete last one is dropped
    assert all(r["img_s"] > 0 for r in rows)
    assert rows[0]["ratio"] == 1.0
    assert rows[2]["ratio"] == pytest.approx(rows[2]["img_s"] / rows[0]["img_s"])
    assert "| --gpu_data | - | 24 |" in capsys.readouterr().out


def test_batches_limits_a_pass(tmp_path):
    write_cifar10(tmp_path, n_per_batch=6)
    rows = bench_loader.main(["--data_path", str(tmp_path), "--device", "cpu", "-b", "4", "-j", "0",
                              "--batches", "2", "--rounds", "1"])
    assert [r["images"] for r in rows] == [8, 8]


def test_missing_dataset_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as err:
        bench_loader.main(["--data_path", str(tmp_path / "nowhere"), "--device", "cpu"])
    assert str(err.value).startswith("bench_loader: ") and "\n" not in str(err.value)
