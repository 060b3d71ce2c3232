"""tools.chain_stats: per-pair scale and spectral norms of the LCR chain, against torch.linalg."""
import pytest
import torch
import torch.nn.functional as F

from models import create_model
from tools import chain_stats
from tools.lcr_power_error import record_chain


def exact_sigma(x, y):
    """Mean over samples of the spectral norm of pool(X) Y^T / N, by torch.linalg in float64."""
    xf = F.adaptive_avg_pool2d(x, y.shape[-2:]).flatten(2)
    yf = y.flatten(2)
    return torch.linalg.matrix_norm(xf @ yf.transpose(1, 2) / yf.shape[2], ord=2).mean()


def signs(x):
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def test_stats_match_an_exact_svd_and_sigma_b_ignores_the_scale_of_the_activations(one_thread):
    torch.manual_seed(0)
    model = create_model("resnet20_1w1a")
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        stats = chain_stats.chain_stats(model, images)
        acts = record_chain(model.train(), images, torch.float64)
    assert all(len(values) == len(acts) - 1 for values in stats.values())
    for k, (x, y) in enumerate(zip(acts[:-1], acts[1:])):
        assert stats["mean abs(A)"][k] == pytest.approx(float(x.abs().mean()), rel=1e-5)
        assert stats["sigma_F"][k] == pytest.approx(float(exact_sigma(x, y)), rel=5e-3)
        assert stats["sigma_B"][k] == pytest.approx(float(exact_sigma(signs(x), signs(y))), rel=5e-3)

    # (the solver is within 0.5 % of the exact value per mean here: a fresh network on random images)
    # the stem's BatchNorm scaled down: its output, the first pair's real input, shrinks, and with it
    # sigma_F, while sigma_B, computed from signs, cannot follow: the failure mode the tool shows
    with torch.no_grad():
        model.bn1.weight.mul_(0.1)
        model.bn1.bias.mul_(0.1)
        shrunk = chain_stats.chain_stats(model, images)
    assert shrunk["mean abs(A)"][0] < 0.2 * stats["mean abs(A)"][0]
    assert shrunk["sigma_F"][0] < 0.2 * stats["sigma_F"][0]
    assert shrunk["sigma_B"][0] > 0.5 * stats["sigma_B"][0]
    assert shrunk["ratio"][0] > 2.5 * stats["ratio"][0]


def test_cli_prints_one_row_per_quantity_and_checkpoint(fake_cifar_run, capsys):
    checkpoint = fake_cifar_run["folder"] / "checkpoint.pth.tar"
    assert chain_stats.main([str(checkpoint), "--images", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| checkpoint | per pair | 1 | 2 |") and lines[0].endswith("| 18 |")
    rows = lines[2:]
    assert [row.split(" | ")[1] for row in rows] == ["mean abs(A)", "sigma_F", "sigma_B", "ratio"]
    assert all(len(row.split(" | ")) == 20 for row in rows)


def test_cli_with_a_missing_checkpoint_is_one_error_line(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        chain_stats.main([str(tmp_path / "nothing.pth.tar")])
    assert str(exit_info.value.code).startswith("error: ") and "nothing.pth.tar" in str(exit_info.value.code)
