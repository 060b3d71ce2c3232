"""tools/bench.py runs every configuration and reports ratios against alpha 0."""
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
