"""The Lipschitz continuity retention regulariser (LCR) of LCR-BNN, paper form.

For the binary layers ``1..K`` on a network's main path, let ``A^{k-1}`` be the real input of layer
``k`` and ``A^K`` the real feature map that leaves the last binary block (METHOD.md section 3).
For each consecutive pair ``X = A^{k-1}`` (B x C1 x H1 x W1), ``Y = A^k`` (B x C2 x H2 x W2)::

    X <- avg_pool(X) to H2 x W2          (only when H1 > H2)
    RM = X_flat @ Y_flat^T / N            N = H2 * W2, one C1 x C2 retention matrix per sample

``RM_F^k`` uses the real activations, ``RM_B^k`` their signs. The Lipschitz estimate of layer ``k``
is the largest singular value ``sigma(RM)`` per sample, found by power iteration; the loss is::

    L_LCR = mean_k mean_batch (sigma(RM_B^k) / sigma(RM_F^k).detach() - 1) ** 2
    L     = CE + alpha * LCR_SCALE * L_LCR

The retention matrix never has to exist: ``RM v = X (Y^T v) / N`` and
``sigma = u^T RM v = (X^T u) . (Y^T v) / N``, whose gradient is rank one. Power iteration runs
without gradient (``u``, ``v`` are detached, so ``d sigma / d RM = u v^T`` exactly) on whichever of
``RM`` or the factors ``X``, ``Y`` is cheaper, always in fp32.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.binary import BinarizeConv2d, binary_sign

__all__ = ["LCR_SCALE", "LCRTap", "retention_matrix", "spectral_norm", "power_iteration",
           "pair_sigma", "chain_sigmas", "LipschitzRegularizer"]

# c in  L = CE + alpha * c * L_LCR. At initialisation L_LCR is about 0.17 (per-layer sigma_B/sigma_F
# 1.2 .. 1.6) for both binary ResNet-20 (CIFAR) and ResNet-18 (ImageNet), so c = 0.06 puts the LCR
# share of the total loss at the recommended --alpha 8 at 3.2 % for ResNet-20 (CE 2.5) and 1.2 % for
# ImageNet ResNet-18 (CE 7.0); CIFAR ResNet-18 6.6 %, VGG-Small 10.4 %, ResNet-34 1.2 %
# (python tools/lcr_share.py). A larger c fails in practice: with c = 0.2 (alpha * c = 1.6) the
# LCR gradient in the first stage is about half of CE's at initialisation and binary ResNet-20 on
# `digits` stayed below 25 % top-1 after 6 epochs, against 90 % with alpha * c = 0.4 or 0.1.
LCR_SCALE = 0.06

VARIANTS = ("paper", "official")


class LCRTap(nn.Identity):
    """Identity that marks the real feature map leaving a model's last binary block.

    Models put it where that map is computed; the regulariser reads it while recording.
    """

    def __init__(self):
        super().__init__()
        self.recorder = None

    def forward(self, x):
        if self.recorder is not None:
            self.recorder(self, x, None)
        return x


def fp32_math():
    """A context in which autocast is off on every device, so the LCR math runs in fp32."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _pool_to(x, size):
    """Average-pool ``x`` (B x C x H x W) to ``size`` (H2, W2); ``x`` must not be smaller."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] < size[0] or x.shape[-1] < size[1]:
        raise ValueError(f"retention matrix needs X at least as large as Y, got {tuple(x.shape)} vs {size}")
    return F.adaptive_avg_pool2d(x, size)


def _factors(x, y):
    """``(X_flat, Y_flat, N)``: X pooled to Y's spatial size, both flattened to B x C x N, fp32."""
    x = _pool_to(x, y.shape[-2:])
    return x.flatten(2).float(), y.flatten(2).float(), y.shape[-2] * y.shape[-1]


def retention_matrix(x, y):
    """``RM = pool(X)_flat @ Y_flat^T / N``: B x C1 x C2 for X (B x C1 x H1 x W1), Y (B x C2 x H2 x W2).

    X is average-pooled to H2 x W2 when H1 > H2; N = H2 * W2.
    """
    xf, yf, n = _factors(x, y)
    return torch.bmm(xf, yf.transpose(1, 2)) / n


def power_iteration(matvec, rmatvec, shape, iters, device):
    """Top singular vectors ``(u, v)`` (B x C1, B x C2, unit norm) of B matrices given as products.

    ``matvec(v) = RM v`` and ``rmatvec(u) = RM^T u``. Starts from the all-ones ``u`` (no random
    numbers, so training RNG streams are untouched) and alternates ``v = RM^T u / |.|``,
    ``u = RM v / |.|`` ``iters`` times. Runs without gradient.
    """
    b, c1 = shape
    with torch.no_grad():
        u = torch.full((b, c1), 1.0 / math.sqrt(c1), device=device)
        v = F.normalize(rmatvec(u), dim=1)
        for _ in range(iters - 1):
            u = F.normalize(matvec(v), dim=1)
            v = F.normalize(rmatvec(u), dim=1)
        u = F.normalize(matvec(v), dim=1)
    return u, v


def _rm_power_iteration(rm, iters):
    """:func:`power_iteration` on explicit matrices ``rm`` (B x C1 x C2)."""
    return power_iteration(lambda v: torch.bmm(rm, v.unsqueeze(2)).squeeze(2),
                           lambda u: torch.bmm(u.unsqueeze(1), rm).squeeze(1),
                           rm.shape[:2], iters, rm.device)


def spectral_norm(rm, iters=5):
    """Largest singular value of each matrix in ``rm`` (B x C1 x C2) by ``iters`` power iterations.

    Returns B values ``sigma = u^T RM v`` with ``u``, ``v`` detached, so the gradient with respect
    to ``RM`` is exactly ``u v^T`` (the gradient of the true norm when it has converged).
    """
    with fp32_math():
        rm32 = rm.float()
        u, v = _rm_power_iteration(rm32, iters)
        return torch.einsum("bi,bij,bj->b", u, rm32, v)


def pair_sigma(x, y, iters=5):
    """``sigma(retention_matrix(x, y))`` per sample without building RM when that is cheaper.

    Equal (up to rounding) to ``spectral_norm(retention_matrix(x, y), iters)`` and with the same
    gradient. Forming RM costs ``N C1 C2`` per sample; iterating on the factors costs
    ``2 N (C1 + C2)`` per iteration, so the cheaper of the two is used for the power iteration.
    ``sigma = (X^T u) . (Y^T v) / N`` is then evaluated on the factors (rank-one gradient).
    """
    with fp32_math():
        xf, yf, n = _factors(x, y)
        with torch.no_grad():
            if _explicit(xf.shape[1], yf.shape[1], iters):
                rm = torch.bmm(xf, yf.transpose(1, 2)) / n
                u, v = _rm_power_iteration(rm, iters)
            else:
                u, v = _factor_power_iteration(xf, yf, n, iters)
        return _rank_one_sigma(xf, yf, n, u, v)


def _explicit(c1, c2, iters):
    """Whether forming RM (N C1 C2 per sample) beats iterating on the factors (2 N (C1+C2) per step)."""
    return c1 * c2 <= 2 * iters * (c1 + c2)


def _projections(xf, yf, u, v):
    """``(X^T u, Y^T v)``: B x N each."""
    return torch.bmm(u.unsqueeze(1), xf).squeeze(1), torch.bmm(v.unsqueeze(1), yf).squeeze(1)


def _rank_one_sigma(xf, yf, n, u, v):
    """``sigma = (X^T u) . (Y^T v) / N`` with ``u``, ``v`` fixed: the gradient is rank one."""
    xu, yv = _projections(xf, yf, u, v)
    return (xu * yv).sum(dim=1) / n


def _pair_power_iterations(signs, reals, iters):
    """Top singular vectors of ``RM_B^k`` and ``sigma(RM_F^k)`` for every consecutive pair, no gradient.

    Every retention matrix that is cheap to form is formed once, and the power iterations of all
    pairs whose matrices have the same shape (binary and real alike) run as one batched iteration;
    the real side's sigma is read off its small matrix. Pairs of wide layers iterate on the factors.
    Returns ``(factors_b, uv_b, sig_f)``: lists over pairs of the binary factors ``(X, Y, N)``,
    of ``(u, v)`` and of B values.
    """
    k_pairs = len(signs) - 1
    uv_b, sig_f = [None] * k_pairs, [None] * k_pairs
    factors_b = [_factors(signs[k], signs[k + 1]) for k in range(k_pairs)]
    groups = {}
    for k in range(k_pairs):
        fb = factors_b[k]
        ff = _factors(reals[k], reals[k + 1])
        c1, c2 = fb[0].shape[1], fb[1].shape[1]
        if _explicit(c1, c2, iters):
            for side, (x, y, n) in (("b", fb), ("f", ff)):
                groups.setdefault((c1, c2), []).append((k, side, torch.bmm(x, y.transpose(1, 2)) / n))
        else:
            uv_b[k] = _factor_power_iteration(*fb, iters)
            sig_f[k] = _rank_one_sigma(*ff, *_factor_power_iteration(*ff, iters))
    for members in groups.values():
        stacked = torch.cat([rm for _, _, rm in members])
        u, v = _rm_power_iteration(stacked, iters)
        start = 0
        for k, side, rm in members:
            ui, vi = u[start:start + rm.shape[0]], v[start:start + rm.shape[0]]
            start += rm.shape[0]
            if side == "b":
                uv_b[k] = (ui, vi)
            else:
                sig_f[k] = torch.einsum("bi,bij,bj->b", ui, rm, vi)
    return factors_b, uv_b, sig_f


def _factor_power_iteration(xf, yf, n, iters):
    """Power iteration on ``RM = X Y^T / N`` through the factors, never forming RM."""
    def matvec(v):
        return torch.bmm(xf, torch.bmm(v.unsqueeze(1), yf).transpose(1, 2)).squeeze(2) / n

    def rmatvec(u):
        return torch.bmm(yf, torch.bmm(u.unsqueeze(1), xf).transpose(1, 2)).squeeze(2) / n
    return power_iteration(matvec, rmatvec, (xf.shape[0], xf.shape[1]), iters, xf.device)


def chain_sigmas(signs, reals, iters=5):
    """``sigma(RM_B^k)`` and ``sigma(RM_F^k)`` for every consecutive pair of a chain, K x B each, no gradient.

    ``signs`` and ``reals`` are the chain ``A^0 .. A^K`` (binary and real). Equal, pair by pair, to
    :func:`pair_sigma` (which is the plain, differentiable reference).
    """
    with torch.no_grad(), fp32_math():
        factors_b, uv_b, sig_f = _pair_power_iterations(signs, reals, iters)
        sig_b = [_rank_one_sigma(*factors_b[k], *uv_b[k]) for k in range(len(uv_b))]
    return torch.stack(sig_b), torch.stack(sig_f)


class _DeferredGrad:
    """The LCR gradient with respect to one recorded binary activation, kept as rank-one factors.

    ``d sigma / d X = u (Y^T v)^T / N`` and ``d sigma / d Y = v (X^T u)^T / N`` per sample, so the
    gradient of ``L_LCR`` with respect to a binary activation is a sum of outer products of small
    vectors. It is materialised (one activation-sized tensor at a time) only when the backward
    pass reaches the activation, instead of 2K activation-sized gradients waiting from the start
    of the backward pass.
    """

    def __init__(self):
        self.terms = []          # (coef B, vec_c B x C, vec_n B x N, spatial size of the term)
        self.scale = None        # d total / d L_LCR, set by the loss node's backward

    def add_to(self, grad):
        """``grad`` plus this activation's LCR gradient, each outer product fused into one kernel."""
        b, c = grad.shape[:2]
        out = None
        for coef, vec_c, vec_n, size in self.terms:
            left = ((coef * self.scale)[:, None] * vec_c).unsqueeze(2)     # B x C x 1
            right = vec_n.unsqueeze(1)                                      # B x 1 x N
            if tuple(size) == tuple(grad.shape[-2:]):
                base = grad.reshape(b, c, -1).float() if out is None else out
                out = torch.baddbmm(base, left, right) if out is None else out.baddbmm_(left, right)
            else:  # X was average-pooled: spread each pooled gradient evenly over its window
                small = torch.bmm(left, right).view(b, c, *size)
                full = _unpool(small, grad.shape[-2:]).reshape(b, c, -1)
                out = grad.reshape(b, c, -1).float() + full if out is None else out.add_(full)
        return out.view(grad.shape).to(grad.dtype)


def _unpool(grad, size):
    """Gradient of ``adaptive_avg_pool2d`` to ``grad``'s spatial size, from input size ``size``."""
    h, w = size
    fh, fw = h // grad.shape[-2], w // grad.shape[-1]
    if fh * grad.shape[-2] == h and fw * grad.shape[-1] == w:
        return grad.repeat_interleave(fh, dim=2).repeat_interleave(fw, dim=3) / (fh * fw)
    return torch.ops.aten._adaptive_avg_pool2d_backward(grad, grad.new_empty(*grad.shape[:2], h, w))


class _InjectLCRGrad(torch.autograd.Function):
    """Identity on a recorded binary activation whose backward adds its deferred LCR gradient."""

    @staticmethod
    def forward(ctx, x, slot):
        ctx.slot = slot
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        slot = ctx.slot
        if slot.scale is None or not slot.terms:
            return grad, None
        return slot.add_to(grad), None


class _LCRLossNode(torch.autograd.Function):
    """Returns the precomputed ``L_LCR`` value; its backward hands ``d total / d L_LCR`` to the slots.

    The recorded activations are inputs only so that the backward pass reaches their
    :class:`_InjectLCRGrad` nodes, which then add the actual gradient.
    """

    @staticmethod
    def forward(ctx, slots, value, *anchors):
        ctx.slots = slots
        ctx.n_anchors = len(anchors)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        for slot in ctx.slots:
            slot.scale = grad.float()
        return (None, None) + (None,) * ctx.n_anchors


class LipschitzRegularizer:
    """Records a model's activations during one forward pass and turns them into ``L_LCR``.

    Usage::

        reg = LipschitzRegularizer(model, variant="paper", iters=5)
        with reg.record():
            logits = model(x)
        loss = ce + alpha * LCR_SCALE * reg.loss()
        reg.stats()            # per-layer mean sigma_B / sigma_F of the last loss() call

    ``variant="paper"``: the module docstring's loss over every main-path :class:`BinarizeConv2d`
    (``lcr_chain`` True) and the model's :class:`LCRTap`. Outside :meth:`record` no hook is
    installed and nothing is kept, so alpha = 0 training pays nothing. Works through DataParallel
    (activations are grouped per device, each replica's chain in forward order) and DDP.
    The training loss is ``CE + alpha * weight_scale * loss()`` with ``weight_scale = LCR_SCALE``.

    ``loss()`` computes its value without building an autograd graph of its own. Its gradient,
    which is exactly that of the formula above (``u``, ``v`` fixed, ``sigma_F`` detached), is
    added to each binary activation when the backward pass reaches it, so the regulariser holds
    only a few vectors per layer between the forward and the backward pass.
    """

    weight_scale = LCR_SCALE

    def __init__(self, model, variant="paper", iters=5):
        if variant not in VARIANTS:
            raise ValueError(f"unknown LCR variant {variant!r}; choose from {', '.join(VARIANTS)}")
        if variant != "paper":
            raise ValueError("the official LCR form is modules.lcr_official.OfficialLCR")
        if iters < 1:
            raise ValueError(f"power iterations must be >= 1, got {iters}")
        self.variant = variant
        self.iters = iters
        self.layers = [m for m in model.modules()
                       if (isinstance(m, BinarizeConv2d) and m.lcr_chain) or isinstance(m, LCRTap)]
        convs = [m for m in self.layers if isinstance(m, BinarizeConv2d)]
        if not convs:
            raise ValueError("LipschitzRegularizer needs a model with BinarizeConv2d layers")
        self._last_conv = convs[-1]
        self._records = {}
        self._ratios = None

    def parameters(self):
        """The paper form has no trainable parameters of its own."""
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        """Nothing to restore (kept for symmetry with the official form)."""

    def _record(self, module, x, x_bin):
        if x_bin is None:  # the feature map after the last binary block: its sign is ours to take
            last = self._last_conv
            x_bin = binary_sign(x, last.t.to(x.device), last.k.to(x.device))
        slot = _DeferredGrad()
        tapped = _InjectLCRGrad.apply(x_bin, slot)
        self._records.setdefault(x.device, []).append((x, tapped, slot))
        return tapped

    @contextlib.contextmanager
    def record(self):
        """Install recorders on the chain's layers for the duration of the block."""
        self._records = {}
        for m in self.layers:
            m.recorder = self._record
        try:
            yield self
        finally:
            for m in self.layers:
                m.recorder = None

    def loss(self):
        """Unweighted ``L_LCR`` (scalar tensor with gradient) from the last recorded forward pass."""
        if not self._records:
            raise RuntimeError("LipschitzRegularizer.loss() needs a forward pass inside record()")
        total = sum(len(chain[0][0]) for chain in self._records.values())
        out_device = next(iter(self._records))
        ratios, slots, anchors = [], [], []
        with torch.no_grad(), fp32_math():
            for chain in self._records.values():
                if len(chain) < 2:
                    raise RuntimeError("the LCR chain needs at least two recorded activations")
                ratios.append(self._chain_terms(chain, total).to(out_device))
                slots += [slot for _, _, slot in chain]
                anchors += [tapped for _, tapped, _ in chain]
            ratio = torch.cat(ratios, dim=1)
            value = ((ratio - 1) ** 2).mean()
        self._records = {}
        self._ratios = ratio.mean(dim=1)
        return _LCRLossNode.apply(slots, value, *anchors)

    def _chain_terms(self, chain, total):
        """Ratios ``sigma_B / sigma_F`` (K x B) of one device's chain; fills the chain's gradient slots."""
        reals = [x.float() for x, _, _ in chain]
        signs = [xb.float() for _, xb, _ in chain]
        factors_b, uv_b, sig_f = _pair_power_iterations(signs, reals, self.iters)
        k_pairs = len(chain) - 1
        ratios = []
        for k in range(k_pairs):
            xf, yf, n = factors_b[k]
            u, v = uv_b[k]
            xu, yv = _projections(xf, yf, u, v)
            sig_b = (xu * yv).sum(dim=1) / n
            denom = sig_f[k].clamp_min(1e-12)
            ratio = sig_b / denom
            # d L / d sigma_B for L = mean over K pairs and all `total` samples of (ratio - 1)^2
            coef = 2 * (ratio - 1) / denom / (k_pairs * total) / n
            size = signs[k + 1].shape[-2:]
            chain[k][2].terms.append((coef, u, yv, size))
            chain[k + 1][2].terms.append((coef, v, xu, size))
            ratios.append(ratio)
        return torch.stack(ratios)

    def stats(self):
        """Per-layer mean ``sigma_B / sigma_F`` (K values, detached) of the last :meth:`loss` call."""
        return self._ratios
