"""The released code's LCR form (``--lcr_variant official``) against an explicit re-computation."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import models
from modules.lcr_official import OfficialLCR, official_loss, stage_modules, top_eigen_estimate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def released_estimate(fm1, fm2):
    """The released formula, written out sample by sample with plain loops and Python floats."""
    values = []
    for b in range(fm1.shape[0]):
        x = fm1[b]
        if x.shape[1] > fm2.shape[2]:
            f = x.shape[1] // fm2.shape[2]
            x = x.reshape(x.shape[0], fm2.shape[2], f, fm2.shape[3], f).mean(dim=(2, 4))
        x = x.reshape(x.shape[0], -1)
        y = fm2[b].reshape(fm2.shape[1], -1)
        n = x.shape[1]
        rm = [[sum(x[i, t].item() * y[j, t].item() for t in range(n)) / n for j in range(y.shape[0])]
              for i in range(x.shape[0])]
        k = [[sum(rm[i][c] * rm[j][c] for c in range(len(rm[0]))) for j in range(len(rm))] for i in range(len(rm))]
        m = [sum(row) for row in k]                      # K @ ones
        norm_m = math.sqrt(sum(v * v for v in m))
        v = [e / norm_m for e in m]
        values.append(math.sqrt(norm_m / math.sqrt(sum(e * e for e in v))))
    return values


def test_top_eigen_estimate_matches_released_formula():
    torch.manual_seed(0)
    fm1, fm2 = torch.randn(3, 4, 4, 4, dtype=torch.float64), torch.randn(3, 5, 2, 2, dtype=torch.float64)
    from modules.lcr import retention_matrix
    ours = top_eigen_estimate(retention_matrix(fm1, fm2).double())
    assert torch.allclose(ours.double(), torch.tensor(released_estimate(fm1, fm2), dtype=torch.float64), rtol=1e-5)


def test_official_loss_matches_released_sum():
    torch.manual_seed(1)
    shapes = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 2, 2), (2, 6, 1, 1)]
    fb = [torch.randn(s) for s in shapes]
    ff = [torch.randn(s) for s in shapes]
    expected = 0.0
    for i in range(3):
        eb, ef = released_estimate(fb[i], fb[i + 1]), released_estimate(ff[i], ff[i + 1])
        expected += sum((a - b) ** 2 for a, b in zip(eb, ef)) / len(eb) / 2 ** (3 - i)
    assert official_loss(fb, ff).item() == pytest.approx(expected, rel=1e-4)


def _pair(binary="resnet18_1w1a", fp="resnet18_cifar_fp"):
    torch.manual_seed(0)
    model = models.create_model(binary, num_classes=10)
    fp_model = models.create_model(fp, num_classes=10)
    return model, fp_model


def _capture_stages(model):
    """Forward hooks that store each stage's output in a dict; returns (dict, hooks)."""
    outputs = {}
    hooks = [s.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o))
             for i, s in enumerate(stage_modules(model))]
    return outputs, hooks


def test_features_come_from_the_main_pass_and_fp_net_is_frozen():
    model, fp_model = _pair()
    fp_model.train()
    reg = OfficialLCR(model, fp_model, batch_size=4)
    with torch.no_grad():
        reg.gamma.copy_(torch.tensor([0.5, 1.5, 2.0, 0.25]))
    x = torch.randn(4, 3, 32, 32)
    stage_out, hooks = _capture_stages(model)
    with reg.record():
        model(x)
    for h in hooks:
        h.remove()
    fp_stats = {k: v.clone() for k, v in fp_model.state_dict().items()}
    loss = reg.loss()

    fp_model.eval()
    fp_feats, hooks = _capture_stages(fp_model)
    with torch.no_grad():
        fp_model(x)
    for h in hooks:
        h.remove()
    fb = [F.hardtanh(stage_out[i]) * reg.gamma[i] for i in range(4)]
    ff = [F.hardtanh(fp_feats[i]) for i in range(4)]
    assert loss.item() == pytest.approx(official_loss(fb, ff).item() / (4 * 10000.0), rel=1e-5)
    # the FP network ran in eval mode: BN running statistics did not move
    for k, v in fp_model.state_dict().items():
        assert torch.equal(v, fp_stats[k]), k
    loss.backward()
    assert reg.gamma.grad is not None and reg.gamma.grad.abs().sum() > 0
    assert all(p.grad is None for p in fp_model.parameters())
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_official_form_needs_stages():
    model = models.create_model("vgg_small_1w1a", num_classes=10)
    with pytest.raises(ValueError, match="layer1"):
        OfficialLCR(model, models.create_model("vgg_small_fp", num_classes=10), batch_size=2)


def _run(args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "cifar/main.py", "--dataset", "fake", "--fake_size", "32,16",
                           "--epochs", "1", "-b", "16", "-j", "0", "-p", "100", "--lip_images", "0",
                           "--lcr_variant", "official"] + args,
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_official_warns_on_random_fp_and_loads_fp_weights(tmp_path):
    res = _run(["--results_dir", str(tmp_path), "-a", "resnet20_1w1a", "--model_fp", "resnet20_fp",
                "--save", "_rand"])
    assert res.returncode == 0, res.stderr
    assert "RANDOM resnet20_fp" in res.stdout + res.stderr
    ckpt = torch.load(tmp_path / "resnet20_1w1a_rand" / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["extra"]["gamma"].shape == (3,)

    weights = tmp_path / "fp.pth"
    torch.save(models.create_model("resnet20_fp", num_classes=10).state_dict(), weights)
    res = _run(["--results_dir", str(tmp_path), "-a", "resnet20_1w1a", "--model_fp", "resnet20_fp",
                "--fp_weights", str(weights), "--save", "_loaded"])
    assert res.returncode == 0, res.stderr
    assert "loaded from" in res.stdout and "RANDOM" not in res.stdout + res.stderr


def test_cli_official_rejects_fp_weights_of_another_model(tmp_path):
    weights = tmp_path / "fp.pth"
    torch.save(models.create_model("vgg_small_fp", num_classes=10).state_dict(), weights)
    res = _run(["--results_dir", str(tmp_path), "-a", "resnet20_1w1a", "--model_fp", "resnet20_fp",
                "--fp_weights", str(weights)])
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error:")
    assert "does not fit model resnet20_fp" in res.stderr
