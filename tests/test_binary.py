"""Tests of ``modules/binary.py``: sign with the EDE backward, ``BinarizeConv2d`` and the t/k schedule.

Every expected value comes from an independent reference written here (METHOD.md section 1):
``w_hat = (W - mean) / std`` with the unbiased std over in*kh*kw of each output filter,
``s = 2 ** round(log2(mean |w_hat|))`` per filter, ``sign(0) = +1``, output
``F.conv2d(sign(a), sign(w_hat) * s)``; EDE gradient ``k t (1 - tanh(t x)^2)`` in closed form.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.binary import BinarizeConv2d, SignEDE, binary_sign, ede_parameters, set_ede_schedule


# ----------------------------------------------------------------------------- references
def ref_sign(x):
    """sign with sign(0) = +1, written differently from the code (torch.sign, then fix the zeros)."""
    return torch.sign(x) + (x == 0).to(x.dtype)


def ref_standardise(weight):
    """``w_hat`` (out x in*kh*kw) and the per-filter power-of-two scale ``s`` (out,), by hand."""
    flat = weight.reshape(weight.shape[0], -1)
    n = flat.shape[1]
    mean = flat.sum(dim=1, keepdim=True) / n
    var = ((flat - mean) ** 2).sum(dim=1, keepdim=True) / (n - 1)
    w_hat = (flat - mean) / var.sqrt()
    scales = [2.0 ** round(math.log2(float(w_hat[o].abs().sum()) / n)) for o in range(flat.shape[0])]
    return w_hat, torch.tensor(scales, dtype=weight.dtype)


def ref_binary_weight(weight):
    w_hat, s = ref_standardise(weight.detach())
    return (ref_sign(w_hat) * s[:, None]).reshape(weight.shape)


def ref_forward(layer, x, sign=ref_sign):
    return F.conv2d(sign(x), ref_binary_weight(layer.weight), layer.bias, layer.stride, layer.padding,
                    layer.dilation, layer.groups)


def ede_ste(z, t, k):
    """Straight-through sign whose forward is ref_sign and whose gradient is d/dz k tanh(t z)."""
    soft = k * torch.tanh(t * z)
    return ref_sign(z).detach() + (soft - soft.detach())


# (in, out, kernel, stride, padding, dilation, groups, H, W)
CONV_CASES = [
    (3, 4, 3, 1, 1, 1, 1, 7, 7),
    (4, 6, 3, 2, 1, 1, 2, 9, 8),
    (6, 6, 3, 1, 2, 2, 3, 10, 10),
    (8, 5, 1, 1, 0, 1, 1, 5, 6),
    (4, 8, (3, 5), (2, 1), (0, 2), 1, 4, 8, 9),
    (6, 6, 3, 1, 1, 1, 6, 6, 6),        # depthwise
    (2, 3, 5, 3, 2, (1, 2), 1, 11, 13),
]


def make_layer(case, bias, dtype=torch.float64, seed=0):
    cin, cout, ks, stride, pad, dil, groups, _, _ = case
    torch.manual_seed(seed)
    layer = BinarizeConv2d(cin, cout, ks, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias)
    if bias:
        nn.init.normal_(layer.bias)
    return layer.to(dtype)


def make_input(case, batch=2, dtype=torch.float64, seed=1):
    cin, _, _, _, _, _, _, h, w = case
    torch.manual_seed(seed)
    return torch.randn(batch, cin, h, w, dtype=dtype)


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CONV_CASES)
def test_forward_matches_conv2d_on_signed_tensors(case, bias):
    layer = make_layer(case, bias)
    x = make_input(case)
    out = layer(x)
    expected = ref_forward(layer, x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES[:3])
def test_binary_weight_is_two_valued_power_of_two_per_filter(case):
    layer = make_layer(case, bias=False)
    bw = layer.binary_weight().detach()
    torch.testing.assert_close(bw, ref_binary_weight(layer.weight), rtol=0, atol=0)
    for o in range(bw.shape[0]):
        values = set(bw[o].abs().flatten().tolist())
        assert len(values) == 1
        (s,) = values
        assert math.log2(s) == round(math.log2(s))


def test_exact_zero_inputs_map_to_plus_one():
    case = (4, 5, 3, 1, 1, 1, 1, 8, 8)
    layer = make_layer(case, bias=True)
    torch.manual_seed(3)
    x = torch.randint(-1, 2, (2, 4, 8, 8)).to(torch.float64)       # about a third exact zeros
    assert (x == 0).sum() > 50
    out = layer(x)
    x_plus = torch.where(x == 0, torch.ones_like(x), x)
    expected = F.conv2d(x_plus, ref_binary_weight(layer.weight), layer.bias, padding=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    with_torch_sign = F.conv2d(torch.sign(x), ref_binary_weight(layer.weight), layer.bias, padding=1)
    assert not torch.allclose(out, with_torch_sign)
    # the sign itself is two-valued
    y = binary_sign(x, torch.tensor(1.0), torch.tensor(1.0))
    assert set(y.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(y[x == 0], torch.ones(int((x == 0).sum()), dtype=x.dtype))


def test_exact_zero_standardised_weight_maps_to_plus_one():
    layer = BinarizeConv2d(1, 2, 3, bias=False).double()
    with torch.no_grad():
        # filter 0: -4..4 (mean 0, the centre is exactly 0 after standardisation);
        # filter 1: 1..9 (mean 5, the centre is exactly the mean)
        layer.weight[0, 0] = torch.arange(-4.0, 5.0).view(3, 3)
        layer.weight[1, 0] = torch.arange(1.0, 10.0).view(3, 3)
    bw = layer.binary_weight().detach()
    # w_hat of -4..4: value / sqrt(60/8); mean |w_hat| = (20/9) / sqrt(7.5) = 0.811 -> s = 2**0 = 1
    s = 2.0 ** round(math.log2((20.0 / 9.0) / math.sqrt(7.5)))
    assert s == 1.0
    expected = torch.tensor([[-1, -1, -1], [-1, 1, 1], [1, 1, 1]], dtype=torch.float64) * s
    assert torch.equal(bw[0, 0], expected)
    assert torch.equal(bw[1, 0], expected)


# ----------------------------------------------------------------------------- EDE backward
TK = [(1e-3, 1000.0), (0.1, 10.0), (1.0, 1.0), (10.0, 1.0), (2.0, 3.0)]
XS = [0.0, 0.3, -0.7, 2.5, -1e-3, 0.0]
GS = [1.0, -2.0, 0.5, 3.0, 1.5, -0.25]


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t,k", TK)
def test_sign_ede_gradient_closed_form(t, k, buffer_dtype):
    x = torch.tensor(XS, dtype=torch.float64, requires_grad=True)
    g = torch.tensor(GS, dtype=torch.float64)
    y = binary_sign(x, torch.tensor(t, dtype=buffer_dtype), torch.tensor(k, dtype=buffer_dtype))
    assert y.dtype == torch.float64
    assert y.tolist() == [1.0, 1.0, -1.0, 1.0, -1.0, 1.0]
    y.backward(g)
    expected = [gi * k * t * (1.0 - math.tanh(t * xi) ** 2) for xi, gi in zip(XS, GS)]
    # at x = 0 the gradient is exactly k t g
    assert expected[0] == k * t * GS[0]
    tol = 1e-12 if buffer_dtype == torch.float64 else 2e-7
    torch.testing.assert_close(x.grad, torch.tensor(expected, dtype=torch.float64), rtol=tol, atol=tol)


def test_sign_ede_apply_equals_binary_sign():
    x = torch.tensor(XS, requires_grad=True)
    t, k = torch.tensor(0.5), torch.tensor(2.0)
    SignEDE.apply(x, t, k).backward(torch.tensor(GS))
    g1 = x.grad.clone()
    x.grad = None
    binary_sign(x, t, k).backward(torch.tensor(GS))
    assert torch.equal(g1, x.grad)


@pytest.mark.parametrize("t,k", TK)
def test_layer_input_gradient_uses_buffers(t, k):
    case = (3, 4, 3, 1, 1, 1, 1, 6, 6)
    layer = make_layer(case, bias=False)
    layer.t.fill_(t)
    layer.k.fill_(k)
    torch.manual_seed(5)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    x[:, :, ::2, ::3] = 0.0                                            # exact zeros too
    x.requires_grad_(True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    # reference: gradient w.r.t. the signed input through conv2d, times the EDE factor
    xb = ref_sign(x.detach()).requires_grad_(True)
    F.conv2d(xb, ref_binary_weight(layer.weight), padding=1).backward(g)
    factor = k * t * (1.0 - torch.tanh(t * x.detach()) ** 2)
    torch.testing.assert_close(x.grad, xb.grad * factor, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- weight gradient
@pytest.mark.parametrize("t,k", [(0.5, 2.0), (1e-3, 1000.0), (10.0, 1.0)])
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[1], CONV_CASES[4]])
def test_gradient_flows_through_weight_standardisation(case, t, k):
    layer = make_layer(case, bias=True)
    layer.t.fill_(t)
    layer.k.fill_(k)
    x = make_input(case).requires_grad_(True)
    out = layer(x)
    torch.manual_seed(7)
    g = torch.randn_like(out)
    out.backward(g)

    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    flat = w.reshape(w.shape[0], -1)
    n = flat.shape[1]
    mean = flat.sum(dim=1, keepdim=True) / n
    std = (((flat - mean) ** 2).sum(dim=1, keepdim=True) / (n - 1)).sqrt()
    w_hat = (flat - mean) / std
    _, s = ref_standardise(w.detach())
    wb = (ede_ste(w_hat, t, k) * s[:, None]).reshape(w.shape)
    ref = F.conv2d(ede_ste(xr, t, k), wb, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    ref.backward(g)
    assert layer.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- t / k schedule
@pytest.mark.parametrize("epochs", [10, 7, 400])
def test_ede_parameters_closed_form(epochs):
    for epoch in (0, epochs // 2, epochs - 1):
        t, k = ede_parameters(epoch, epochs)
        # Tmin = 1e-3, Tmax = 10: t = 10 ** (-3 + 4 epoch / E)
        t_ref = 10.0 ** (-3.0 + 4.0 * epoch / epochs)
        assert t == pytest.approx(t_ref, rel=1e-12)
        assert k == pytest.approx(max(1.0 / t_ref, 1.0), rel=1e-12)
    assert ede_parameters(0, epochs) == (pytest.approx(1e-3), pytest.approx(1000.0))


def test_ede_parameters_known_points_and_flags():
    assert ede_parameters(5, 10) == (pytest.approx(0.1, rel=1e-12), pytest.approx(10.0, rel=1e-12))
    t, k = ede_parameters(9, 10)
    assert t == pytest.approx(10 ** 0.6, rel=1e-12) and k == 1.0
    # IR-Net's VGG-Small range 0.1 .. 10: t(E/2) = 1, k = 1
    assert ede_parameters(4, 8, t_min=0.1, t_max=10.0) == (pytest.approx(1.0, rel=1e-12), pytest.approx(1.0))
    assert ede_parameters(0, 8, t_min=0.1, t_max=10.0) == (pytest.approx(0.1), pytest.approx(10.0))
    with pytest.raises(ValueError):
        ede_parameters(0, 0)


def _nested_binary_model():
    inner = nn.Sequential(BinarizeConv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                          nn.Sequential(BinarizeConv2d(4, 4, 1)))
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), inner, nn.ModuleList([BinarizeConv2d(4, 2, 3)]))


@pytest.mark.parametrize("wrap", [False, True])
def test_set_ede_schedule_reaches_every_binary_conv(wrap):
    from models import create_model
    for model in (_nested_binary_model(), create_model("resnet20_1w1a")):
        binaries = [m for m in model.modules() if isinstance(m, BinarizeConv2d)]
        assert binaries
        target = nn.DataParallel(model) if wrap else model
        epochs = 10
        for epoch in (0, epochs // 2, epochs - 1):
            t, k = set_ede_schedule(target, epoch, epochs)
            t_ref = 10.0 ** (-3.0 + 4.0 * epoch / epochs)
            assert t == pytest.approx(t_ref, rel=1e-12)
            assert k == pytest.approx(max(1.0 / t_ref, 1.0), rel=1e-12)
            for m in binaries:
                assert float(m.t) == pytest.approx(t_ref, rel=1e-6)
                assert float(m.k) == pytest.approx(max(1.0 / t_ref, 1.0), rel=1e-6)


def test_ede_buffers_are_in_state_dict_and_load():
    from models import create_model
    model = create_model("resnet20_1w1a")
    set_ede_schedule(model, 3, 10, t_min=0.01, t_max=10.0)
    sd = model.state_dict()
    names = [n for n, m in model.named_modules() if isinstance(m, BinarizeConv2d)]
    assert len(names) == 18
    t_ref = 0.01 * 1000.0 ** 0.3
    for n in names:
        assert float(sd[n + ".t"]) == pytest.approx(t_ref, rel=1e-6)
        assert float(sd[n + ".k"]) == pytest.approx(1.0 / t_ref, rel=1e-6)
    fresh = create_model("resnet20_1w1a")
    fresh.load_state_dict(sd, strict=True)
    for n, m in fresh.named_modules():
        if isinstance(m, BinarizeConv2d):
            assert float(m.t) == pytest.approx(t_ref, rel=1e-6)


# ----------------------------------------------------------------------------- dtype
def test_autocast_bfloat16_runs_and_is_finite():
    case = (16, 8, 3, 1, 1, 1, 1, 8, 8)
    layer = make_layer(case, bias=True, dtype=torch.float32)
    x = make_input(case, dtype=torch.float32).requires_grad_(True)
    ref = ref_forward(layer, x.detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert torch.isfinite(out).all()
    # sums of +-s with |sum| <= 144 s round to bf16 within 2**-8 relative; bias adds one rounding
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=5e-2)
    out.float().sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sign_equals_where_on_edge_values(dtype):
    # -0.0, the smallest subnormals, infinities and a random tensor: sign(0) = +1 whatever the sign bit
    edge = torch.tensor([0.0, -0.0, 1e-45, -1e-45, float("inf"), -float("inf"), 1.0, -1.0], dtype=dtype)
    x = torch.cat([edge, torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(dtype)])
    y = binary_sign(x, torch.tensor(1.0), torch.tensor(1.0))
    assert torch.equal(y, torch.where(x >= 0, 1.0, -1.0).to(dtype))
    tiny_negative = -1.0 if dtype != torch.bfloat16 else 1.0     # -1e-45 rounds to -0.0 in bfloat16
    assert y[:4].tolist() == [1.0, 1.0, 1.0, tiny_negative]


def test_sign_keeps_dtype():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = torch.tensor([-1.5, 0.0, 2.0]).to(dtype)
        y = binary_sign(x, torch.tensor(1.0), torch.tensor(1.0))
        assert y.dtype == dtype
        assert y.tolist() == [-1.0, 1.0, 1.0]


@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate"])
def test_padding_mode_is_honoured(mode):
    torch.manual_seed(0)
    layer = BinarizeConv2d(2, 3, 3, padding=1, padding_mode=mode, bias=False).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    padded = F.pad(ref_sign(x), (1, 1, 1, 1), mode=mode)
    expected = F.conv2d(padded, ref_binary_weight(layer.weight))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
