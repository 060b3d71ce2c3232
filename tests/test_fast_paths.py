"""The opt-in fast paths (``--channels_last``, ``--amp``) against the plain path, on CPU.

A binary network at initialisation is chaotic: layouts that round a batch-norm differently flip a
few signs, and the flips spread (ResNet-20: two flipped signs in layer 3 become 40 % by the last
layer). So the layouts are compared where results must agree: the binary convolution itself
(exact integer sums), the full-precision twin, and the LCR on the same activations.
"""
import copy

import torch
import torch.nn.functional as F

import models
from conftest import CIFAR_MAIN, COMMON_FLAGS, FAKE_FLAGS, assert_ok, read_summary, run_main
from modules.binary import BinarizeConv2d
from modules.lcr import chain_sigmas


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def test_binary_conv_is_exact_in_channels_last():
    torch.manual_seed(0)
    conv = BinarizeConv2d(16, 32, 3, stride=2, padding=1, bias=False)
    x = torch.randn(4, 16, 12, 12)
    plain = conv(x)
    fast = copy.deepcopy(conv).to(memory_format=torch.channels_last)(_cl(x))
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast.contiguous(), plain)       # sums of +-s with power-of-two s: no rounding


def test_fp_twin_step_agrees_in_channels_last():
    # Layouts round differently, so a value within rounding of a hardtanh bound can be clipped in one
    # and not the other; the batch norm before it then spreads that one element's gradient over its
    # channel (a few % per tensor with 1 thread here). So the whole gradient is compared by direction.
    torch.manual_seed(0)
    model = models.create_model("resnet20_fp")
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    losses = [F.cross_entropy(net(inp), y) for net, inp in ((model, x), (twin, _cl(x)))]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    plain = torch.cat([p.grad.flatten() for p in model.parameters()])
    fast = torch.cat([p.grad.flatten() for p in twin.parameters()])
    assert F.cosine_similarity(plain, fast, dim=0) > 0.995          # 0.9998 with one flipped element
    torch.testing.assert_close(fast.norm(), plain.norm(), rtol=0.02, atol=0)


def test_lcr_sigmas_agree_on_channels_last_activations():
    torch.manual_seed(1)
    shapes = [(4, 16, 16, 16), (4, 16, 16, 16), (4, 32, 8, 8), (4, 64, 4, 4)]
    reals = [torch.randn(s).clamp(-1, 1) for s in shapes]
    signs = [torch.where(a >= 0, 1.0, -1.0) for a in reals]
    plain = chain_sigmas(signs, reals, 5)
    fast = chain_sigmas([_cl(s) for s in signs], [_cl(a) for a in reals], 5)
    for got, want in zip(fast, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_channels_last_and_amp_flags_train_on_cpu(tmp_path):
    result = run_main(CIFAR_MAIN, *FAKE_FLAGS, *COMMON_FLAGS, "--epochs", "1", "--alpha", "8", "--lip_images", "0",
                      "--channels_last", "--amp", "--results_dir", tmp_path)
    assert_ok(result)
    folder = tmp_path / "resnet20_1w1a"
    log = (folder / "log.txt").read_text()
    assert "--amp: bfloat16 autocast is for GPUs; training on the CPU in fp32" in log
    row = read_summary(folder / "summary.csv")[0]
    assert row["train_lcr"] > 0 and 0 <= row["val_top1"] <= 100
