"""tools/bench.py runs every configuration and reports ratios against alpha 0."""
import re

import pytest

from tools import bench


def test_bench_reports_both_forms_with_ratios(capsys):
    rows = bench.main(["--models", "resnet20_1w1a", "--batch_sizes", "4", "--device", "cpu", "--warmup", "1",
                       "--steps", "1", "--rounds", "1", "--threads", "1"])
    assert [r["config"] for r in rows] == ["alpha 0", "alpha 8 paper", "alpha 8 official"]
    base = rows[0]
    assert base["time_ratio"] == 1.0 and base["mem_ratio"] == 1.0
    for r in rows[1:]:
        assert r["time_ratio"] == pytest.approx(r["step_ms"] / base["step_ms"])
        assert r["mem_ratio"] == pytest.approx(r["peak_mib"] / base["peak_mib"])
        assert r["peak_mib"] > 0
    out = capsys.readouterr().out
    assert "| resnet20_1w1a | 4 | alpha 8 paper |" in out and "# device:" in out


def test_alpha0_step_records_nothing():
    cfg = bench.Config("resnet20_1w1a", 2, "none", 8.0, bench.torch.device("cpu"), False, False, 5)
    assert cfg.reg is None and cfg.weight == 0.0
    cfg.step()
    assert all(getattr(m, "recorder", None) is None for m in cfg.model.modules())


def test_paired_ratio_cancels_drift_between_rounds():
    # the machine is twice as slow in round 2 and a burst hits one step of round 3: per-round
    # ratios stay 1.1, while the ratio of overall medians would not
    base = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [1.0, 9.0, 1.0]]
    lcr = [[1.1, 1.1, 1.1], [2.2, 2.2, 2.2], [1.1, 1.1, 1.1]]
    assert bench.paired_ratio(lcr, base) == pytest.approx(1.1)
    assert bench.paired_ratio(base, base) == 1.0


def test_profile_lists_the_ops_that_grew(capsys):
    bench.main(["--models", "resnet20_1w1a", "--batch_sizes", "4", "--device", "cpu", "--warmup", "1",
                "--steps", "1", "--rounds", "1", "--threads", "1", "--forms", "paper", "--profile", "5"])
    out = capsys.readouterr().out
    assert "# alpha 8 paper: self CPU ms" in out
    listed = [line for line in out.splitlines() if re.match(r"#\s+[+-]\d+\.\d\d\s", line)]
    assert len(listed) == 5
    assert any("bmm" in line for line in listed)     # the retention-matrix products are new work


def test_threads_flag_does_not_leak_into_the_caller():
    before = bench.torch.get_num_threads()
    bench.main(["--models", "resnet20_1w1a", "--batch_sizes", "2", "--device", "cpu", "--warmup", "0",
                "--steps", "1", "--rounds", "1", "--threads", str(before + 1), "--forms", "paper"])
    assert bench.torch.get_num_threads() == before
