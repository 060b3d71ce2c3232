"""Tests of the packed 1-bit format: ``modules/xnor.py`` (bit packing, XNOR-popcount convolution,
``PackedBinaryConv2d``) and ``tools/export.py`` (export, reload from the file alone, equivalence).

References are written here independently of the code: ``sign(0) = +1`` by ``torch.sign`` plus a
fix of the zeros, the binary convolution as ``F.conv2d`` in float64 on the signed input (zero padding
of the signed input, so padded positions contribute 0), bit counts with ``bin(i).count("1")``.
"""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import tools.export as export_module
from models import create_model, list_models
from modules.binary import BinarizeConv2d
from modules.xnor import (PackedBinaryConv2d, pack_signs, popcount_uint8, set_xnor_reference,
                          unpack_signs, xnor_conv2d, xnor_popcount_conv2d)
from tools.export import (ExportError, build_packed_model, compare_on, export_packed, fp32_size_bytes,
                          input_spec, load_packed, main as export_main)
from utils.checkpoint import FORMAT_VERSION, load_file, save_atomic
from utils.data import build_datasets

BINARY_MODELS = [n for n in list_models() if "1w1a" in n]
LOGIT_TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The test machines share 2 cores with other jobs; oversubscribed OpenMP threads spin and make
    # these small forwards several times slower than one thread does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ref_sign(x):
    return torch.sign(x) + (x == 0).to(x.dtype)


def with_zeros(x, frac=0.3):
    """``x`` with about ``frac`` of its entries set to exactly 0 (where sign conventions matter)."""
    return torch.where(torch.rand_like(x) < frac, torch.zeros_like(x), x)


# ----------------------------------------------------------------------------- bits
def test_popcount_every_byte():
    v = torch.arange(256, dtype=torch.uint8)
    expected = torch.tensor([bin(i).count("1") for i in range(256)])
    assert torch.equal(popcount_uint8(v).long(), expected)


def test_pack_layout_is_msb_first_and_pads_with_zero_bits():
    w = torch.tensor([[1., -1, -1, -1, -1, -1, -1, 0, 1, -1]])  # 0 is +1
    packed = pack_signs(w)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0b10000001, 0b10000000]]


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (5, 1, 1, 1), (3, 7, 1, 5), (2, 16, 2, 2)])
def test_pack_unpack_round_trip(shape):
    torch.manual_seed(0)
    w = with_zeros(torch.randn(shape))
    signs = ref_sign(w)
    packed = pack_signs(w)
    n = w[0].numel()
    assert packed.shape == (shape[0], (n + 7) // 8)
    assert torch.equal(unpack_signs(packed, shape), signs)
    assert torch.equal(pack_signs(signs > 0), packed)
    assert torch.equal(pack_signs(signs), packed)


# ----------------------------------------------------------------------------- XNOR convolution
CONV_CASES = [
    # in, out, kernel, stride, padding, dilation, groups, height, width
    (3, 4, 3, 1, 1, 1, 1, 7, 7),
    (8, 6, 3, 2, 1, 1, 2, 9, 8),
    (5, 7, 1, 1, 0, 1, 1, 5, 5),
    (4, 4, 3, 1, 2, 2, 4, 6, 7),
    (6, 3, 2, 3, 3, 1, 3, 8, 8),
    (16, 8, 3, 1, 1, 1, 1, 6, 6),
    (3, 5, (3, 1), (2, 1), (1, 0), 1, 1, 7, 5),
    (2, 2, 5, 1, 4, 1, 1, 4, 4),  # padding larger than half the kernel: whole rows padded
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_xnor_conv_equals_conv2d_on_signed_tensors(case):
    cin, cout, k, stride, padding, dilation, groups, h, w = case
    k = k if isinstance(k, tuple) else (k, k)
    torch.manual_seed(1)
    a = with_zeros(torch.randn(2, cin, h, w))
    weight = with_zeros(torch.randn(cout, cin // groups, *k))
    exponents = torch.randint(-4, 3, (cout,), dtype=torch.int8)
    scale = torch.pow(2.0, exponents.double()).view(-1, 1, 1, 1)
    ref_dot = F.conv2d(ref_sign(a).double(), ref_sign(weight).double(), None, stride, padding, dilation,
                       groups)
    packed = pack_signs(weight)
    dot = xnor_popcount_conv2d(a, packed, weight.shape, stride, padding, dilation, groups)
    assert dot.dtype == torch.int32
    assert torch.equal(dot.double(), ref_dot)
    ref = F.conv2d(ref_sign(a).double(), ref_sign(weight).double() * scale, None, stride, padding,
                   dilation, groups)
    out = xnor_conv2d(ref_sign(a), packed, weight.shape, exponents, stride, padding, dilation, groups)
    assert torch.equal(out.double(), ref)


def test_padded_positions_contribute_zero():
    a = -torch.ones(1, 1, 3, 3)
    weight = torch.ones(1, 1, 3, 3)
    dot = xnor_popcount_conv2d(a, pack_signs(weight), weight.shape, padding=1)
    # A corner sees 4 real inputs (-1 each) and 5 padded zeros; -1 or +1 padding would give -9 or -1.
    assert dot[0, 0].tolist() == [[-4, -6, -4], [-6, -9, -6], [-4, -6, -4]]


@pytest.mark.parametrize("stride, padding, dilation, groups, mode", [
    (1, 1, 1, 1, "zeros"), (2, 1, 1, 2, "zeros"), (1, 2, 2, 1, "zeros"), (1, 1, 1, 1, "reflect"),
    (2, 2, 1, 1, "circular"), (1, (2, 1), 1, 2, "replicate")])
def test_packed_layer_equals_binarize_conv2d(stride, padding, dilation, groups, mode):
    torch.manual_seed(2)
    layer = BinarizeConv2d(6, 8, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                           bias=False, padding_mode=mode)
    x = with_zeros(torch.randn(2, 6, 9, 9))
    e = export_packed(nn.Sequential(layer), "single_layer", 0)["binary_layers"]["0"]
    packed = PackedBinaryConv2d(e["bits"], e["shape"], e["exponent"], e["stride"], e["padding"],
                                e["dilation"], e["groups"], padding_mode=e["padding_mode"])
    with torch.no_grad():
        expected = layer(x)
        fast = packed(x)
        packed.reference = True
        xnor = packed(x)
    assert torch.equal(fast, expected)
    assert torch.equal(xnor, expected)


# ----------------------------------------------------------------------------- whole models
def randomise_batch_norms(model, seed):
    """Non-trivial eval statistics and affines (negative gammas too) in every batch norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 2)
                m.running_var.copy_(torch.rand(c, generator=g) * 20 + 0.5)
                m.weight.copy_((torch.rand(c, generator=g) + 0.5) * torch.where(
                    torch.rand(c, generator=g) < 0.2, -1.0, 1.0))
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return model.eval()


def small_input(name, seed):
    """CIFAR models at 32x32 batch 4, ImageNet models at 64x64 batch 2."""
    classes, side = input_spec(name)
    batch, side = (2, 64) if side == 224 else (4, 32)
    return classes, torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", BINARY_MODELS)
def test_export_reload_every_binary_model(name, tmp_path):
    torch.manual_seed(0)
    classes, x = small_input(name, seed=1)
    model = randomise_batch_norms(create_model(name, num_classes=classes), seed=2)
    path = os.path.join(tmp_path, "packed.pt")
    save_atomic(export_packed(model, name, classes), path)
    del_keys = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, BinarizeConv2d)}

    raw = load_file(path)  # weights_only=True
    assert raw["model"] == name and raw["num_classes"] == classes
    assert not del_keys & set(raw["state_dict"])
    assert set(raw["binary_layers"]) == {k[:-len(".weight")] for k in del_keys}
    for entry in raw["binary_layers"].values():
        assert entry["bits"].dtype == torch.uint8 and entry["exponent"].dtype == torch.int8

    packed = load_packed(path)
    assert not any(isinstance(m, BinarizeConv2d) for m in packed.modules())
    with torch.no_grad():
        expected, out = model(x), packed(x)
    torch.testing.assert_close(out, expected, **LOGIT_TOL)
    assert torch.equal(out.argmax(1), expected.argmax(1))

    # Without folding nothing is re-rounded: packed bits and exponents reproduce the model bit for bit.
    unfolded = build_packed_model(export_packed(model, name, classes, fold=False))
    with torch.no_grad():
        assert torch.equal(unfolded(x), expected)


def test_folding_rules():
    vgg = create_model("vgg_small_1w1a")
    folds = export_packed(vgg, "vgg_small_1w1a", 10)["folded"]
    # FP stem conv -> BN, and the two binary convs not followed by a max-pool.
    assert folds == {"features.1": "features.0", "features.8": "features.7", "features.15": "features.14"}
    r18 = export_packed(create_model("resnet18_1w1a_IR"), "resnet18_1w1a_IR", 1000)
    assert "bn2" not in r18["folded"]  # BatchNorm1d before the classifier stays
    assert r18["folded"]["layer2.0.downsample.1"] == "layer2.0.downsample.0"
    assert r18["folded"]["layer1.0.bn1"] == "layer1.0.conv1"
    assert len(r18["folded"]) == 1 + 16 + 3


def test_xnor_reference_path_on_a_model():
    torch.manual_seed(3)
    classes, x = small_input("resnet20_1w1a", seed=4)
    model = randomise_batch_norms(create_model("resnet20_1w1a", num_classes=classes), seed=5)
    packed = build_packed_model(export_packed(model, "resnet20_1w1a", classes))
    with torch.no_grad():
        fast = packed(x[:2])
        xnor = set_xnor_reference(packed)(x[:2])
    assert torch.equal(xnor, fast)


def test_vgg_small_packed_file_is_20x_smaller(tmp_path):
    model = create_model("vgg_small_1w1a")
    path = os.path.join(tmp_path, "vgg.pt")
    save_atomic(export_packed(model, "vgg_small_1w1a", 10), path)
    # 4.57 M binary weights are 571 kB of bits; the fp32 8192x10 classifier (328 kB) and the stem stay
    # as they are, which caps the ratio near 20.4x; the container adds about 10 kB.
    assert fp32_size_bytes(model) / os.path.getsize(path) > 19.5


# ----------------------------------------------------------------------------- digits checkpoint, CLI
def train_digits_resnet20(steps=20, batch=16):
    torch.manual_seed(0)
    train_set, val_set, classes = build_datasets("digits")
    model = create_model("resnet20_1w1a", num_classes=classes)
    # Adam learns fastest in so few steps (33 % top-1 after 20 against 17 % for SGD at lr 0.1).
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(train_set, batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    model.train()
    for _, (images, labels) in zip(range(steps), loader):
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), val_set, classes


def test_digits_checkpoint_export_reload_same_top1(tmp_path, capsys):
    model, val_set, classes = train_digits_resnet20()
    ckpt = os.path.join(tmp_path, "model_best.pth.tar")
    save_atomic({"format_version": FORMAT_VERSION, "model": "resnet20_1w1a", "num_classes": classes,
                 "state_dict": model.state_dict(), "epoch": 1}, ckpt)
    out = os.path.join(tmp_path, "resnet20.packed")
    assert export_main([ckpt, out]) == 0
    assert "compression" in capsys.readouterr().out
    packed = load_packed(out)  # from the file alone
    r = compare_on(model, packed, DataLoader(val_set, batch_size=150))
    assert r["images"] == len(val_set) == 450
    assert r["top1_original"] > 15  # trained: above the 10 % of chance
    assert r["top1_packed"] == r["top1_original"]
    assert r["predictions_differ"] == 0
    assert r["max_logit_diff"] < 1e-4


def test_cli_bare_state_dict_and_fake_check(tmp_path, capsys):
    torch.manual_seed(0)
    model = randomise_batch_norms(create_model("resnet20_1w1a"), seed=6)
    sd = os.path.join(tmp_path, "sd.pth")
    torch.save(model.state_dict(), sd)
    out = os.path.join(tmp_path, "out.packed")
    assert export_main([sd, out]) == 2
    assert "--model" in capsys.readouterr().err
    assert export_main([sd, out, "--model", "resnet20_1w1a", "--num_classes", "10", "--check", "fake"]) == 0
    text = capsys.readouterr().out
    assert "0 predictions differ" in text and "64 images" in text


@pytest.mark.parametrize("folded_differ,kept_differ,no_fold,code", [
    (1, 0, False, 0),     # folding's rounding flipped a sign; the packed weights are exact
    (20, 0, False, 1),    # a third of the 64 images: more than rounding, the fold is wrong
    (1, 2, False, 1),     # the packed weights themselves disagree
    (1, None, True, 1),   # --no_fold: no second network to blame, the check fails
])
def test_check_tells_folding_rounding_from_wrong_packed_weights(tmp_path, capsys, monkeypatch, folded_differ,
                                                                  kept_differ, no_fold, code):
    real_compare, calls = export_module.compare_on, []

    def bn_count(net):
        return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())

    def compare(original, packed, loader):
        r = real_compare(original, packed, loader)
        folded = bn_count(packed) < bn_count(original)
        calls.append(folded)
        return dict(r, predictions_differ=folded_differ if folded or no_fold else kept_differ)

    monkeypatch.setattr(export_module, "compare_on", compare)
    torch.manual_seed(0)
    sd = os.path.join(tmp_path, "sd.pth")
    torch.save(randomise_batch_norms(create_model("resnet20_1w1a"), seed=6).state_dict(), sd)
    args = [sd, os.path.join(tmp_path, "out.packed"), "--model", "resnet20_1w1a", "--num_classes", "10",
            "--check", "fake"] + (["--no_fold"] if no_fold else [])
    assert export_main(args) == code
    out = capsys.readouterr().out
    assert calls == ([False] if no_fold else [True, False])
    assert ("with every batch norm kept (--no_fold)" in out) == (not no_fold)
    assert ("folding's rounding" in out) == (code == 0)
    assert ("the fold is wrong" in out) == (folded_differ == 20)


def test_loader_rejects_other_files(tmp_path):
    path = os.path.join(tmp_path, "ckpt.pt")
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ExportError, match="not a packed"):
        load_packed(path)
