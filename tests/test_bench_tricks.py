"""tools.bench_tricks: every speed trick is timed against its plain formula on one step's work."""
import pytest
import torch

from modules import speed
from tools import bench_tricks


def test_every_trick_is_timed_and_the_plain_path_really_runs(monkeypatch):
    seen = []
    original = speed.plain_formulas

    def spy(*names):
        seen.append(names)
        return original(*names)

    monkeypatch.setattr(speed, "plain_formulas", spy)
    threads = torch.get_num_threads()
    rows = bench_tricks.main(["--batch", "2", "--reps", "1"])
    assert [r["trick"] for r in rows] == list(speed.TRICKS)
    assert all(r["trick_ms"] > 0 and r["plain_ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert {names for names in seen} == {(name,) for name in speed.TRICKS}
    assert torch.get_num_threads() == threads


def test_bad_counts_are_refused():
    with pytest.raises(SystemExit):
        bench_tricks.main(["--reps", "0"])
