"""Tests of ``modules/lcr.py``: retention matrices, power iteration and the Lipschitz regulariser.

References (METHOD.md section 3) are written here independently: retention matrices by explicit loops
(pooling by reshape + mean), the top singular value by ``torch.linalg.matrix_norm(ord=2)`` in float64,
and the regulariser's loss from activations captured with our own forward pre-hooks.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import create_model
from modules import lcr
from modules.binary import BinarizeConv2d, set_ede_schedule
from modules.lcr import (LCRTap, LipschitzRegularizer, _explicit, _pool_to, chain_sigmas, pair_sigma,
                         retention_matrix, spectral_norm)


# ----------------------------------------------------------------------------- references
def ref_pool(x, h2, w2):
    """Average-pool B x C x H x W to h2 x w2 by reshape/mean (H, W multiples of h2, w2)."""
    b, c, h, w = x.shape
    if (h, w) == (h2, w2):
        return x
    assert h % h2 == 0 and w % w2 == 0
    return x.reshape(b, c, h2, h // h2, w2, w // w2).mean(dim=(3, 5))


def ref_rm_loop(x, y):
    """RM[b, i, j] = sum_n X[b, i, n] Y[b, j, n] / N by explicit loops, in float64."""
    x, y = x.double(), y.double()
    b, c1 = x.shape[:2]
    c2, h2, w2 = y.shape[1:]
    xf = ref_pool(x, h2, w2).reshape(b, c1, -1)
    yf = y.reshape(b, c2, -1)
    n = h2 * w2
    rm = torch.zeros(b, c1, c2, dtype=torch.float64)
    for bi in range(b):
        for i in range(c1):
            for j in range(c2):
                acc = 0.0
                for k in range(n):
                    acc += float(xf[bi, i, k]) * float(yf[bi, j, k])
                rm[bi, i, j] = acc / n
    return rm


def ref_rm(x, y):
    """Vectorised float64 reference (checked against :func:`ref_rm_loop` below)."""
    x, y = x.double(), y.double()
    h2, w2 = y.shape[-2:]
    xf = ref_pool(x, h2, w2).flatten(2)
    return torch.einsum("bin,bjn->bij", xf, y.flatten(2)) / (h2 * w2)


def ref_sign(x):
    return torch.sign(x) + (x == 0).to(x.dtype)


def exact_sigma(rm):
    return torch.linalg.matrix_norm(rm.double(), ord=2)


def capture_chain(model):
    """Pre-hooks on every main-path BinarizeConv2d and the model's LCRTap; returns (inputs, handles)."""
    acts, handles = [], []

    def hook(module, inputs):
        acts.append(inputs[0].detach().clone())

    for m in model.modules():
        if (isinstance(m, BinarizeConv2d) and m.lcr_chain) or isinstance(m, LCRTap):
            handles.append(m.register_forward_pre_hook(hook))
    return acts, handles


def ref_ratios(acts):
    """K x B matrix of sigma(RM_B) / sigma(RM_F), all in float64 with exact singular values."""
    rows = []
    for a, b in zip(acts[:-1], acts[1:]):
        s_b = exact_sigma(ref_rm(ref_sign(a), ref_sign(b)))
        s_f = exact_sigma(ref_rm(a, b))
        rows.append(s_b / s_f)
    return torch.stack(rows)


def gapped_matrices(batch, c1, c2, seed, dtype=torch.float64):
    """U diag(s) V^T with s = [10, 1, 0.5, 0.25, ...]: a clear gap below the top singular value."""
    g = torch.Generator().manual_seed(seed)
    r = min(c1, c2)
    u, _ = torch.linalg.qr(torch.randn(batch, c1, r, generator=g, dtype=dtype))
    v, _ = torch.linalg.qr(torch.randn(batch, c2, r, generator=g, dtype=dtype))
    s = torch.tensor([10.0] + [2.0 ** -i for i in range(r - 1)], dtype=dtype)
    return u @ torch.diag_embed(s.expand(batch, r)) @ v.transpose(1, 2)


# ----------------------------------------------------------------------------- retention matrix
@pytest.mark.parametrize("shapes", [
    ((2, 3, 4, 4), (2, 5, 4, 4)),       # equal spatial size
    ((2, 4, 8, 8), (2, 3, 4, 4)),       # X pooled 2x2
    ((1, 3, 6, 9), (1, 2, 2, 3)),       # X pooled 3x3, non-square
])
def test_retention_matrix_matches_loop(shapes):
    torch.manual_seed(0)
    x, y = torch.randn(shapes[0]), torch.randn(shapes[1])
    rm = retention_matrix(x, y)
    expected = ref_rm_loop(x, y)
    assert rm.shape == expected.shape
    torch.testing.assert_close(rm.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref_rm(x, y), expected, rtol=1e-12, atol=1e-12)


def test_retention_matrix_of_signs_and_closed_form():
    # all-ones X and Y: RM = ones (sum of N products / N); X = +1, Y = -1: RM = -1
    x = torch.ones(1, 2, 4, 4)
    y = -torch.ones(1, 3, 2, 2)
    torch.testing.assert_close(retention_matrix(x, y), -torch.ones(1, 2, 3))
    # pooling averages: X = checkerboard of +-1 averages to 0 over each 2x2 window
    cb = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 2.0 - 1.0
    torch.testing.assert_close(retention_matrix(cb.expand(1, 1, 4, 4), torch.ones(1, 1, 2, 2)),
                               torch.zeros(1, 1, 1))


@pytest.mark.parametrize("shape,size,channels_last", [
    ((3, 4, 8, 8), (4, 4), False),      # the usual 2x2
    ((2, 3, 6, 9), (2, 3), False),      # 3x3 windows, non-square
    ((2, 3, 8, 8), (8, 4), False),      # pooled along W only
    ((2, 3, 8, 8), (4, 4), True),       # channels_last input: the pooling kernel's path
    ((2, 3, 7, 7), (4, 4), False),      # overlapping adaptive windows
])
def test_pool_to_equals_adaptive_avg_pool(shape, size, channels_last):
    torch.manual_seed(0)
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_pool_to(x, size), F.adaptive_avg_pool2d(x, size), rtol=1e-6, atol=1e-6)


def test_retention_matrix_rejects_smaller_x():
    with pytest.raises(ValueError):
        retention_matrix(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 4, 4))


# ----------------------------------------------------------------------------- spectral norm
@pytest.mark.parametrize("shape", [(8, 8), (16, 12), (5, 20)])
def test_spectral_norm_matches_matrix_norm(shape):
    torch.manual_seed(1)
    rm = torch.randn(6, *shape, dtype=torch.float64)
    sigma = spectral_norm(rm, iters=200)
    assert sigma.shape == (6,)
    torch.testing.assert_close(sigma.double(), exact_sigma(rm), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(8, 8), (12, 7), (6, 16)])
def test_spectral_norm_gradient_is_top_singular_pair(shape):
    rm = gapped_matrices(3, *shape, seed=2).requires_grad_(True)
    spectral_norm(rm, iters=30).sum().backward()
    got = rm.grad.clone()
    rm.grad = None
    exact_sigma(rm).sum().backward()
    torch.testing.assert_close(got, rm.grad, rtol=0, atol=1e-5)
    # the exact gradient is u1 v1^T: rank one, unit Frobenius norm
    torch.testing.assert_close(torch.linalg.matrix_norm(got.double()), torch.ones(3, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert torch.linalg.matrix_rank(got.double(), atol=1e-5).tolist() == [1, 1, 1]
    ten = torch.full((3,), 10.0, dtype=torch.float64)
    torch.testing.assert_close(spectral_norm(rm, iters=30).double(), ten, rtol=1e-6, atol=0)


def textbook_power_iteration(rm, iters):
    """METHOD.md's alternation, one matrix at a time in float64: v = RM^T u / |.|, u = RM v / |.|."""
    out = []
    for m in rm.double():
        u = torch.ones(m.shape[0], dtype=torch.float64) / m.shape[0] ** 0.5
        for _ in range(iters):
            v = m.T @ u
            v = v / v.norm()
            u = m @ v
            u = u / u.norm()
        out.append(u @ m @ v)
    return torch.stack(out)


@pytest.mark.parametrize("iters", [1, 2, 5])
@pytest.mark.parametrize("shape", [(7, 7), (16, 5), (3, 24)])
def test_spectral_norm_follows_the_textbook_sequence(shape, iters):
    # few iterations, far from convergence: the value pins down the exact sequence of vectors
    torch.manual_seed(6)
    rm = torch.randn(5, *shape)
    torch.testing.assert_close(spectral_norm(rm, iters).double(), textbook_power_iteration(rm, iters),
                               rtol=1e-5, atol=0)


def test_power_iteration_in_chunks_equals_one_batch(monkeypatch):
    # on CPU the matrices are iterated on in cache-sized chunks; 3 matrices per chunk here
    torch.manual_seed(7)
    rm = torch.randn(10, 6, 4)
    whole = spectral_norm(rm, 5)
    monkeypatch.setattr(lcr, "_CPU_CHUNK_BYTES", 3 * 6 * 4 * 4)
    torch.testing.assert_close(spectral_norm(rm, 5), whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(whole.double(), textbook_power_iteration(rm, 5), rtol=1e-5, atol=0)


def test_spectral_norm_one_iteration_is_finite_and_a_lower_bound():
    torch.manual_seed(3)
    rm = torch.randn(4, 9, 9, dtype=torch.float64)
    s1 = spectral_norm(rm, iters=1).double()
    assert torch.isfinite(s1).all()
    assert (s1 <= exact_sigma(rm) * (1 + 1e-6)).all()
    assert (s1 > 0).all()


# ----------------------------------------------------------------------------- pair_sigma
PAIR_CASES = [
    # (C1, C2, H1, H2, iters, forms RM): which branch pair_sigma takes is _explicit(C1, C2, N, iters)
    (8, 8, 6, 6, 5, True),
    (64, 64, 6, 6, 5, False),       # iterates on the factors
    (8, 8, 8, 4, 5, True),          # X pooled
    (32, 64, 8, 4, 5, False),       # factors, X pooled
    (64, 64, 4, 4, 1, False),       # factors, a single iteration
    (16, 8, 8, 4, 3, True),         # rectangular, pooled
]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("c1,c2,h1,h2,iters,forms_rm", PAIR_CASES)
def test_pair_sigma_equals_spectral_norm_of_rm(c1, c2, h1, h2, iters, forms_rm, signed):
    assert _explicit(c1, c2, h2 * h2, iters) == forms_rm
    torch.manual_seed(4)
    x = torch.randn(3, c1, h1, h1)
    y = torch.randn(3, c2, h2, h2)
    if signed:
        x, y = ref_sign(x), ref_sign(y)
    x1, y1 = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    x2, y2 = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    s_pair = pair_sigma(x1, y1, iters)
    s_ref = spectral_norm(retention_matrix(x2, y2), iters)
    torch.testing.assert_close(s_pair, s_ref, rtol=2e-5, atol=0)
    w = torch.tensor([1.0, -0.5, 2.0])
    (s_pair * w).sum().backward()
    (s_ref * w).sum().backward()
    scale = x2.grad.abs().max()
    assert scale > 0
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-3, atol=1e-5 * scale)
    torch.testing.assert_close(y1.grad, y2.grad, rtol=1e-3, atol=1e-5 * y2.grad.abs().max())


@pytest.mark.parametrize("iters,side,forms_rm", [(15, 4, False), (100, 8, True)])
def test_pair_sigma_converges_to_exact_norm(iters, side, forms_rm):
    # a dominant shared component gives RM a clear spectral gap, so few iterations suffice
    torch.manual_seed(5)
    b, c, n = 2, 64, side * side
    assert _explicit(c, c, n, iters) == forms_rm
    z = torch.randn(b, 1, n)
    x = 3 * torch.randn(b, c, 1) * z + torch.randn(b, c, n)
    y = 3 * torch.randn(b, c, 1) * z + torch.randn(b, c, n)
    x, y = x.view(b, c, side, side), y.view(b, c, side, side)
    torch.testing.assert_close(pair_sigma(x, y, iters).double(), exact_sigma(ref_rm(x, y)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("iters", [1, 5, 40])
@pytest.mark.parametrize("name,size", [("resnet20_1w1a", 32), ("vgg_small_1w1a", 32)])
def test_chain_sigmas_equals_pair_sigma(name, size, iters):
    torch.manual_seed(0)
    model = create_model(name)
    acts, handles = capture_chain(model)
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
    for h in handles:
        h.remove()
    signs = [ref_sign(a) for a in acts]
    sig_b, sig_f = chain_sigmas(signs, acts, iters)
    assert sig_b.shape == sig_f.shape == (len(acts) - 1, 2)
    exp_b = torch.stack([pair_sigma(a, b, iters) for a, b in zip(signs[:-1], signs[1:])])
    exp_f = torch.stack([pair_sigma(a, b, iters) for a, b in zip(acts[:-1], acts[1:])])
    torch.testing.assert_close(sig_b, exp_b, rtol=1e-5, atol=0)
    torch.testing.assert_close(sig_f, exp_f, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- the regulariser
# (model, input size, batch, recorded activations = main-path binary convs + the tap)
CHAIN_CASES = [
    ("resnet20_1w1a", 32, 4, 19),
    ("resnet18_1w1a", 32, 2, 17),
    ("vgg_small_1w1a", 32, 2, 6),
    ("resnet18_1w1a_IR", 64, 2, 17),
]


def _run_recorded(name, size, batch, iters=100, seed=0):
    torch.manual_seed(seed)
    model = create_model(name)
    x = torch.randn(batch, 3, size, size)
    reg = LipschitzRegularizer(model, iters=iters)
    acts, handles = capture_chain(model)
    with reg.record():
        logits = model(x)
    for h in handles:
        h.remove()
    return model, reg, acts, logits


@pytest.mark.parametrize("name,size,batch,count", CHAIN_CASES)
def test_regularizer_records_the_chain(name, size, batch, count):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(batch, 3, size, size)
    reg = LipschitzRegularizer(model, iters=2)
    assert len(reg.layers) == count
    acts, handles = capture_chain(model)
    calls = []
    with reg.record():
        for m in reg.layers:
            # the documented recorder protocol: recorder(layer, x) -> signs of x (ignored for the tap)
            def counting(layer, a, inner=m.recorder):
                a_bin = inner(layer, a)
                calls.append((layer, a.detach().clone(), a_bin.detach().clone()))
                return a_bin
            m.recorder = counting
        model(x)
    for h in handles:
        h.remove()
    assert all(m.recorder is None for m in reg.layers)
    assert len(acts) == count and len(calls) == count
    for (layer, a, a_bin), ours in zip(calls, acts):
        assert torch.equal(a, ours)
        assert torch.equal(a_bin, ref_sign(ours))
    assert isinstance(calls[-1][0], LCRTap)
    assert sum(isinstance(layer, LCRTap) for layer, _, _ in calls) == 1
    loss = reg.loss()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert reg.stats().shape == (count - 1,)


# power iterations per model: real retention matrices at initialisation can have
# sigma_2 / sigma_1 > 0.99 (ResNet-20's 32 -> 64 transition), so some need many to reach 1e-3
RECOMPUTE_ITERS = {"resnet20_1w1a": 500, "resnet18_1w1a": 300, "vgg_small_1w1a": 100, "resnet18_1w1a_IR": 100}


@pytest.mark.parametrize("name,size,batch", [(n, s, b) for n, s, b, _ in CHAIN_CASES])
def test_regularizer_loss_matches_independent_recomputation(name, size, batch):
    _, reg, acts, _ = _run_recorded(name, size, batch, iters=RECOMPUTE_ITERS[name])
    ratios = ref_ratios(acts)
    expected = ((ratios - 1) ** 2).mean()
    loss = reg.loss()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-3, atol=0)
    torch.testing.assert_close(reg.stats().double(), ratios.mean(dim=1), rtol=1e-3, atol=0)


def test_regularizer_with_set_schedule_epoch0():
    # t, k change only the backward: the recorded loss matches the reference either way
    torch.manual_seed(0)
    model = create_model("resnet20_1w1a")
    set_ede_schedule(model, 0, 10)
    reg = LipschitzRegularizer(model, iters=500)
    acts, handles = capture_chain(model)
    with reg.record():
        model(torch.randn(4, 3, 32, 32))
    for h in handles:
        h.remove()
    torch.testing.assert_close(reg.loss().double(), ((ref_ratios(acts) - 1) ** 2).mean(), rtol=1e-3, atol=0)


def test_regularizer_loss_gradient_reaches_parameters():
    torch.manual_seed(0)
    model = create_model("resnet20_1w1a")
    reg = LipschitzRegularizer(model)
    with reg.record():
        model(torch.randn(4, 3, 32, 32))
    reg.loss().backward()
    binary = [m for m in model.modules() if isinstance(m, BinarizeConv2d)]
    assert all(m.weight.grad is not None for m in binary)
    assert binary[0].weight.grad.abs().sum() > 0
    assert binary[-1].weight.grad.abs().sum() > 0
    assert model.conv1.weight.grad.abs().sum() > 0          # stem: through the first sign's EDE
    assert model.layer2[0].bn1.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None                        # after the tap: no LCR gradient


def ede_ste(z, t, k):
    """Straight-through sign: forward ref_sign, gradient of k tanh(t z) (IR-Net's EDE)."""
    soft = k * torch.tanh(t * z)
    return ref_sign(z).detach() + (soft - soft.detach())


def capture_chain_with_graph(model):
    """Like :func:`capture_chain` but keeps the autograd graph; also records each hooked module."""
    acts, handles = [], []

    def hook(module, inputs):
        acts.append((module, inputs[0]))

    for m in model.modules():
        if (isinstance(m, BinarizeConv2d) and m.lcr_chain) or isinstance(m, LCRTap):
            handles.append(m.register_forward_pre_hook(hook))
    return acts, handles


def reference_lcr(acts, sigma_b, sigma_f):
    """L_LCR from captured activations: EDE signs (the tap uses the last binary conv's t, k)."""
    last = [m for m, _ in acts if isinstance(m, BinarizeConv2d)][-1]
    signs = []
    for m, a in acts:
        owner = m if isinstance(m, BinarizeConv2d) else last
        signs.append(ede_ste(a, float(owner.t), float(owner.k)))
    reals = [a.detach() for _, a in acts]
    terms = []
    for i in range(len(acts) - 1):
        s_b = sigma_b(signs[i], signs[i + 1])
        s_f = sigma_f(reals[i], reals[i + 1]).detach()
        terms.append((s_b / s_f - 1) ** 2)
    return torch.stack(terms).mean()


class _OddSizes(nn.Module):
    """A tiny binary net whose activations are 7x7 -> 4x4 -> 2x2: overlapping adaptive pooling windows."""

    def __init__(self, num_classes=10):
        super().__init__()
        def block(conv):
            return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.Hardtanh())
        self.stem = block(nn.Conv2d(3, 8, 3, padding=1, bias=False))
        # no conv biases: a bias before BatchNorm has a zero gradient, only rounding noise to compare
        self.body = nn.Sequential(block(BinarizeConv2d(8, 8, 3, stride=2, padding=1, bias=False)),
                                  block(BinarizeConv2d(8, 16, 3, stride=2, padding=1, bias=False)),
                                  block(BinarizeConv2d(16, 16, 3, padding=1, bias=False)))
        self.lcr_tap = LCRTap()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.lcr_tap(self.body(self.stem(x))).mean(dim=(2, 3)))


def _compare_lcr_gradients(name, size, batch, iters, sigma_b, sigma_f, with_ce, rtol, rel_atol,
                           channels_last=False):
    torch.manual_seed(0)
    model = _OddSizes() if name == "odd_sizes" else create_model(name)
    set_ede_schedule(model, 3, 10)                                # t = 0.0158, k = 63.1
    twin = copy.deepcopy(model)
    x = torch.randn(batch, 3, size, size)
    if channels_last:  # the activations' gradients are then not contiguous: the out-of-place path
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(batch) % 10
    weight = 2.5

    reg = LipschitzRegularizer(model, iters=iters)
    with reg.record():
        logits = model(x)
    lcr = reg.loss()
    total = weight * lcr + (F.cross_entropy(logits, y) if with_ce else 0)
    total.backward()

    acts, handles = capture_chain_with_graph(twin)
    logits_ref = twin(x)
    for h in handles:
        h.remove()
    lcr_ref = reference_lcr(acts, sigma_b, sigma_f)
    total_ref = weight * lcr_ref + (F.cross_entropy(logits_ref, y) if with_ce else 0)
    total_ref.backward()

    torch.testing.assert_close(lcr.double(), lcr_ref.double(), rtol=rtol, atol=0)
    checked = 0
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), n
            continue
        scale = q.grad.abs().max()
        torch.testing.assert_close(p.grad.double(), q.grad.double(), rtol=rtol, atol=float(rel_atol * scale),
                                   msg=lambda m, n=n: f"{n}: {m}")
        checked += scale > 0
    assert checked >= 3


@pytest.mark.parametrize("with_ce", [False, True])
@pytest.mark.parametrize("name,size,batch", [("resnet20_1w1a", 32, 4), ("vgg_small_1w1a", 32, 2),
                                             ("resnet18_1w1a_IR", 64, 2), ("odd_sizes", 7, 3)])
def test_regularizer_gradient_equals_autograd_at_default_iters(name, size, batch, with_ce):
    # loss() builds no graph of its own and injects rank-one gradients during the backward pass;
    # they must equal autograd through the formula with the same 5 power iterations (pair_sigma,
    # itself checked against spectral_norm and matrix_norm above)
    _compare_lcr_gradients(name, size, batch, 5, lambda a, b: pair_sigma(a, b, 5),
                           lambda a, b: pair_sigma(a, b, 5), with_ce, rtol=1e-4, rel_atol=1e-4)


def test_regularizer_gradient_with_channels_last_activations():
    _compare_lcr_gradients("resnet20_1w1a", 32, 4, 5, lambda a, b: pair_sigma(a, b, 5),
                           lambda a, b: pair_sigma(a, b, 5), True, rtol=1e-4, rel_atol=1e-4, channels_last=True)


def test_regularizer_gradient_equals_exact_singular_value_gradient():
    # with many iterations the gradient is that of the exact largest singular value (u1 v1^T)
    _compare_lcr_gradients("resnet20_1w1a", 32, 4, 2000, lambda a, b: exact_sigma(ref_rm(a, b)),
                           lambda a, b: exact_sigma(ref_rm(a, b)), False, rtol=2e-3, rel_atol=2e-3)


def test_regularizer_loss_under_autocast_is_fp32():
    torch.manual_seed(0)
    model = create_model("resnet20_1w1a")
    reg = LipschitzRegularizer(model, iters=500)
    acts, handles = capture_chain(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with reg.record():
            model(torch.randn(4, 3, 32, 32))
        loss = reg.loss()
    for h in handles:
        h.remove()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ((ref_ratios(acts) - 1) ** 2).mean(), rtol=1e-3, atol=0)


def test_no_recorder_outside_record():
    torch.manual_seed(0)
    model = create_model("resnet20_1w1a")
    hooked = [m for m in model.modules() if isinstance(m, (BinarizeConv2d, LCRTap))]
    assert len(hooked) == 19
    reg = LipschitzRegularizer(model)
    assert all(m.recorder is None for m in hooked)
    x = torch.randn(2, 3, 32, 32)
    model(x)
    assert reg._records == {}
    with pytest.raises(RuntimeError):
        reg.loss()
    with reg.record():
        assert all(m.recorder is not None for m in hooked)
        model(x)
    assert all(m.recorder is None for m in hooked)
    recorded = {d: list(c) for d, c in reg._records.items()}
    model(x)                                                   # outside: nothing is added
    assert {d: len(c) for d, c in reg._records.items()} == {d: len(c) for d, c in recorded.items()}
    reg.loss()
    assert reg._records == {}
    with pytest.raises(RuntimeError):
        reg.loss()                                             # records are used once
    with pytest.raises(KeyError):
        with reg.record():
            raise KeyError("boom")
    assert all(m.recorder is None for m in hooked)


@pytest.mark.parametrize("name", ["resnet20_1w1a", "vgg_small_1w1a"])
def test_alpha_zero_is_bit_identical(name):
    torch.manual_seed(0)
    model_a = create_model(name)
    model_b = copy.deepcopy(model_a)
    model_c = copy.deepcopy(model_a)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 3, 7, 9])

    logits_a = model_a(x)
    loss_a = F.cross_entropy(logits_a, y)
    loss_a.backward()

    # alpha = 0: a regulariser exists for the model but is never asked to record
    LipschitzRegularizer(model_b)
    loss_b = F.cross_entropy(model_b(x), y)
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    for (na, pa), (nb, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert na == nb
        assert pa.grad is not None and torch.equal(pa.grad, pb.grad), na
    for (na, ba), (_, bb) in zip(model_a.named_buffers(), model_b.named_buffers()):
        assert torch.equal(ba, bb), na

    # recording must not change the computation: same logits, CE and CE gradients
    reg_c = LipschitzRegularizer(model_c)
    with reg_c.record():
        logits_c = model_c(x)
    assert torch.equal(logits_c, logits_a)
    loss_c = F.cross_entropy(logits_c, y)
    assert torch.equal(loss_c, loss_a)
    loss_c.backward()
    for (na, pa), (_, pc) in zip(model_a.named_parameters(), model_c.named_parameters()):
        assert torch.equal(pa.grad, pc.grad), na


def test_record_does_not_change_logits():
    torch.manual_seed(0)
    model = create_model("resnet18_1w1a_IR")
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    reg = LipschitzRegularizer(twin)
    with reg.record():
        inside = twin(x)
    outside = model(x)
    assert torch.equal(inside, outside)
    model.eval()
    twin.eval()
    with reg.record():
        inside = twin(x)
    assert torch.equal(inside, model(x))


def test_regularizer_through_dataparallel_on_cpu():
    torch.manual_seed(0)
    model = create_model("resnet20_1w1a")
    x = torch.randn(4, 3, 32, 32)
    reg_plain = LipschitzRegularizer(model, iters=20)
    with reg_plain.record():
        model(x)
    plain = reg_plain.loss()
    wrapped = nn.DataParallel(copy.deepcopy(model))
    reg_dp = LipschitzRegularizer(wrapped, iters=20)
    with reg_dp.record():
        wrapped(x)
    torch.testing.assert_close(reg_dp.loss(), plain, rtol=1e-6, atol=0)


def test_regularizer_argument_checks():
    model = create_model("resnet20_1w1a")
    with pytest.raises(ValueError):
        LipschitzRegularizer(model, variant="nope")
    with pytest.raises((ValueError, NotImplementedError)):      # the official form is another class
        LipschitzRegularizer(model, variant="official")
    with pytest.raises(ValueError):
        LipschitzRegularizer(model, iters=0)
    with pytest.raises(ValueError):
        LipschitzRegularizer(create_model("resnet20_fp"))


def test_spectral_norm_and_pair_sigma_are_fp32_under_autocast():
    torch.manual_seed(6)
    rm = torch.randn(4, 16, 16)
    x, y = torch.randn(2, 64, 8, 8), torch.randn(2, 64, 4, 4)
    plain_rm, plain_pair = spectral_norm(rm, 50), pair_sigma(x, y, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_rm, auto_pair = spectral_norm(rm, 50), pair_sigma(x, y, 5)
    assert auto_rm.dtype == torch.float32 and auto_pair.dtype == torch.float32
    torch.testing.assert_close(auto_rm, plain_rm, rtol=1e-5, atol=0)
    torch.testing.assert_close(auto_pair, plain_pair, rtol=1e-5, atol=0)
