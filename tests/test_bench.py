"""tools/bench.py runs every configuration and reports ratios against alpha 0."""
import re

import pytest

from tools import bench


def test_bench_reports_every_form_and_its_plain_twin_without_profiler_noise(capfd):
    rows = bench.main(["--models", "resnet20_1w1a", "--batch_sizes", "4", "--device", "cpu", "--warmup", "1",
                       "--steps", "1", "--rounds", "1", "--threads", "1", "--plain"])
    assert [r["config"] for r in rows] == ["alpha 0", "alpha 0 plain", "alpha 8 paper", "alpha 8 paper plain",
                                           "alpha 8 official", "alpha 8 official plain"]
    assert all(r["peak_mib"] > 0 and r["step_ms"] > 0 for r in rows)
    out, err = capfd.readouterr()            # file-descriptor level: what native code prints shows too
    assert "| resnet20_1w1a | 4 | alpha 8 paper plain |" in out and "# device:" in out
    assert "too few for a stable ratio" in out
    assert err == "", err                    # no profiler start/stop or device-count lines


def test_bench_times_each_surrogate_of_the_paper_form(capsys):
    rows = bench.main(["--models", "resnet20_1w1a", "--batch_sizes", "2", "--device", "cpu", "--warmup", "0",
                       "--steps", "1", "--rounds", "1", "--threads", "1", "--forms", "paper", "--surrogates", "tanh",
                       "ede", "--sigma_f", "differentiable", "detached", "--plain", "slope"])
    assert [r["config"] for r in rows] == [
        "alpha 0", "alpha 0 plain slope", "alpha 8 paper", "alpha 8 paper sigma_F detached", "alpha 8 paper ede",
        "alpha 8 paper plain slope", "alpha 8 paper sigma_F detached plain slope", "alpha 8 paper ede plain slope"]


def test_bench_times_each_solver_of_the_paper_form(capsys):
    rows = bench.main(["--models", "resnet20_1w1a", "--batch_sizes", "2", "--device", "cpu", "--warmup", "0",
                       "--steps", "1", "--rounds", "1", "--threads", "1", "--forms", "paper", "--surrogates", "ede",
                       "--lcr_solvers", "default", "1x5"])
    assert [r["config"] for r in rows] == ["alpha 0", "alpha 8 paper ede", "alpha 8 paper ede solver 1x5"]
    cfg = bench.Config("resnet20_1w1a", 2, "paper", 8.0, bench.torch.device("cpu"), False, False, "3x7")
    assert (cfg.reg.block, cfg.reg.steps) == (3, 7)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--lcr_solvers", "1y5"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --lcr_solvers: a solver is 'default' or PxK (block x steps, e.g. 1x5), got '1y5'"]


def test_bench_on_cuda_without_a_gpu_is_one_error_line(capsys):
    if bench.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == ["error: --device cuda but this machine has no GPU; "
                                                            "pass --device cpu"]


def test_alpha0_step_hooks_nothing():
    cfg = bench.Config("resnet20_1w1a", 2, "none", 8.0, bench.torch.device("cpu"), False, False)
    assert cfg.reg is None and cfg.weight == 0.0
    cfg.step()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in cfg.model.modules())


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
