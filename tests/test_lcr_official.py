"""The released code's LCR form (``--lcr_variant official``) against re-computations written here from
the released files (42Shawn/LCR_BNN ``LCR/imagenet/LCR.py``, ``models/resnet.py``, ``main.py``)."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from conftest import randomise_batch_norms
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
    loss, logs = reg.loss()
    assert logs == {}

    fp_model.eval()
    fp_feats, hooks = _capture_stages(fp_model)
    with torch.no_grad():
        fp_model(x)
    for h in hooks:
        h.remove()
    fb = [F.hardtanh(stage_out[i]) * reg.gamma[i] for i in range(4)]
    ff = [F.relu(fp_feats[i]) for i in range(4)]
    assert loss.item() == pytest.approx(official_loss(fb, ff).item() / (4 * 10000.0), rel=1e-5)
    # the FP network ran in eval mode: BN running statistics did not move
    for k, v in fp_model.state_dict().items():
        assert torch.equal(v, fp_stats[k]), k
    loss.backward()
    assert reg.gamma.grad is not None and reg.gamma.grad.abs().sum() > 0
    assert all(p.grad is None for p in fp_model.parameters())
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0


# --- the released computation on the ImageNet networks -------------------------------------------------


class _ReleasedFPBlock(nn.Module):
    """``models/resnet.py`` BasicBlock as released: a ReLU on the way in, none on the way out."""

    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        x = F.relu(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return out + (x if self.downsample is None else self.downsample(x))


class _ReleasedFPResNet18(nn.Module):
    """The released FP ResNet-18 up to ``extract_feature(x, preReLU=False)``: the ReLU'd stage outputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes, stages = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            stages.append(nn.Sequential(_ReleasedFPBlock(inplanes, planes, stride, down),
                                        _ReleasedFPBlock(planes, planes, 1, None)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, 1000)

    def extract_feature(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        feats = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feats.append(x)
        return [F.relu(f) for f in feats]


def _released_retention_matrix(fm1, fm2):
    if fm1.size(2) > fm2.size(2):
        fm1 = F.adaptive_avg_pool2d(fm1, (fm2.size(2), fm2.size(3)))
    fm1 = fm1.view(fm1.size(0), fm1.size(1), -1)
    fm2 = fm2.view(fm2.size(0), fm2.size(1), -1).transpose(1, 2)
    return torch.bmm(fm1, fm2) / fm1.size(2)


def _released_top_eigenvalue(k):
    v = torch.ones(k.shape[0], k.shape[1], 1, dtype=k.dtype)
    m = torch.bmm(k, v)
    n = torch.norm(m, dim=1).unsqueeze(1)
    v = m / n
    return torch.sqrt(n / torch.norm(v, dim=1).unsqueeze(1))


def _released_lcr(fp_feats, binary_feats):
    """``LCR.forward``: sum over consecutive pairs of MSE(top eigenvalue estimates) / 2 ** (S - i - 1)."""
    loss, s = 0, len(fp_feats)
    for i in range(s - 1):
        rm_b = _released_retention_matrix(binary_feats[i], binary_feats[i + 1])
        rm_f = _released_retention_matrix(fp_feats[i].detach(), fp_feats[i + 1].detach())
        loss = loss + F.mse_loss(_released_top_eigenvalue(torch.bmm(rm_b, rm_b.transpose(2, 1))),
                                 _released_top_eigenvalue(torch.bmm(rm_f, rm_f.transpose(2, 1)))) / 2 ** (s - i - 1)
    return loss


def test_imagenet_official_form_equals_the_released_computation():
    torch.manual_seed(0)
    fp_model = models.create_model("resnet18_fp")
    # a trained network's BatchNorm: many stage outputs above 1
    randomise_batch_norms(fp_model, mean_std=0.3, var=(0.3, 1.0), weight=(0.8, 2.0), bias_mean=0.3, bias_std=0.3)
    released_fp = _ReleasedFPResNet18()
    released_fp.load_state_dict(fp_model.state_dict(), strict=True)
    released_fp.eval()
    model = models.create_model("resnet18_1w1a_IR")
    twin = copy.deepcopy(model)
    batch = 3
    x = torch.randn(batch, 3, 64, 64)

    reg = OfficialLCR(model, fp_model, batch_size=batch)
    gamma = torch.tensor([[0.7, 1.3, 0.9, 1.6]])
    with torch.no_grad():
        reg.gamma.copy_(gamma[0])
    with reg.record():
        model(x)
    loss, _ = reg.loss()
    loss.backward()

    # the released code: scaleable_feature (hardtanh'd stages times gamma) against extract_feature
    ref_gamma = gamma.clone().requires_grad_(True)
    stages, outputs = [twin.layer1, twin.layer2, twin.layer3, twin.layer4], {}
    hooks = [s.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)) for i, s in enumerate(stages)]
    twin(x)
    for h in hooks:
        h.remove()
    binary_feats = [ref_gamma[0, i] * F.hardtanh(outputs[i]) for i in range(4)]
    with torch.no_grad():
        fp_feats = released_fp.extract_feature(x)
    assert max(float(f.max()) for f in fp_feats) > 1.5        # where a hardtanh would have clipped
    reference = _released_lcr(fp_feats, binary_feats) / batch / 10000
    reference.backward()

    torch.testing.assert_close(loss.double(), reference.double(), rtol=1e-4, atol=0)
    torch.testing.assert_close(reg.gamma.grad, ref_gamma.grad[0], rtol=1e-4,
                               atol=1e-4 * float(ref_gamma.grad.abs().max()))
    checked = 0
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if q.grad is None or not q.grad.any():
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * float(q.grad.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")
        checked += 1
    assert checked > 20


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


@pytest.mark.slow(reason="three runs of the CIFAR script: about 9 s; loading FP weights and the official "
                        "form's computation are checked in-process in the default set")
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


def test_fp_pretrained_offline_is_one_line_naming_the_file_to_place(tmp_path):
    # the released default FP network is torchvision's pretrained ResNet-18: without a network the
    # run stops before training with one line that says where the weights go, or --fp_weights
    from conftest import IMAGENET_MAIN, script_env
    env = dict(script_env(), TORCH_HOME=str(tmp_path / "torch_home"), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    res = subprocess.run([sys.executable, str(IMAGENET_MAIN), "--dataset", "fake", "--fake_size", "8,4",
                          "--fake_image_size", "64", "-b", "4", "-j", "0", "--epochs", "1", "--lip_images", "0",
                          "--lcr_variant", "official", "--fp_pretrained", "--results_dir", str(tmp_path / "runs")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    expected = os.path.join(str(tmp_path / "torch_home"), "hub", "checkpoints", "resnet18-")
    assert expected in lines[0] and "--fp_weights" in lines[0], lines[0]
    assert not (tmp_path / "runs" / "resnet18_1w1a_IR").exists()      # nothing left behind
