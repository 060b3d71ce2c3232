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
            self.recorder(self, x)
        return x


def fp32_math():
    """A context in which autocast is off on every device, so the LCR math runs in fp32."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _pool_to(x, size):
    """Average-pool ``x`` (B x C x H x W) to ``size`` (H2, W2); ``x`` must not be smaller."""
    (h1, w1), (h2, w2) = x.shape[-2:], tuple(size)
    if (h1, w1) == (h2, w2):
        return x
    if h1 < h2 or w1 < w2:
        raise ValueError(f"retention matrix needs X at least as large as Y, got {tuple(x.shape)} vs {(h2, w2)}")
    fh, fw = h1 // h2, w1 // w2
    if fh * h2 != h1 or fw * w2 != w1 or not x.is_contiguous():
        return F.adaptive_avg_pool2d(x, (h2, w2))
    # Whole-window pooling as sums of slices: first the fh input rows of each output row (whole
    # contiguous rows), then the fw neighbours in a row. Equal to avg_pool2d up to rounding and
    # several times faster on CPU.
    rows = x.reshape(-1, fh, w1)
    out = rows[:, 0] * (1.0 / (fh * fw))
    for i in range(1, fh):
        out.add_(rows[:, i], alpha=1.0 / (fh * fw))
    cols = out.view(-1, fw)
    pooled = cols[:, 0].clone()
    for j in range(1, fw):
        pooled.add_(cols[:, j])
    return pooled.view(*x.shape[:-2], h2, w2)


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
    ``u = RM v / |.|`` ``iters`` times. Runs without gradient. (``v`` is normalised only at the
    end: the direction of ``RM v`` does not depend on the scale of ``v``.)
    """
    b, c1 = shape
    with torch.no_grad():
        u = torch.full((b, c1), 1.0 / math.sqrt(c1), device=device)
        for _ in range(iters):
            v = rmatvec(u)
            u = matvec(v)
            u = u.div_(u.norm(dim=1, keepdim=True).clamp_min_(1e-12))
        v = v.div_(v.norm(dim=1, keepdim=True).clamp_min_(1e-12))
    return u, v


# On CPU the power iterations on explicit matrices run on chunks of about this many bytes, so that
# the ``2 * iters`` passes over a chunk are served from the cache rather than from main memory.
_CPU_CHUNK_BYTES = 2 << 20


def _row_times(vec, mat):
    """``vec_b^T mat_b`` for B x C vectors and B x C x D matrices (any strides): B x D.

    The row-vector form is the fast batched matrix-vector product on CPU, also for a transposed
    view of ``mat`` (the column form ``mat @ vec`` is several times slower there).
    """
    return torch.bmm(vec.unsqueeze(1), mat).squeeze(1)


def _bilinear(u, rm, v):
    """``u_b^T RM_b v_b`` for each b (differentiable in ``rm``)."""
    return (_row_times(u, rm) * v).sum(dim=1)


def _rm_power_iteration(rm, iters):
    """:func:`power_iteration` on explicit matrices ``rm`` (B x C1 x C2): ``(u, v, sigma)``.

    ``sigma = u^T RM v`` (B values). No gradient. On CPU the matrices are taken in cache-sized chunks.
    """
    b, c1, c2 = rm.shape
    per = b if rm.device.type != "cpu" else max(1, _CPU_CHUNK_BYTES // (4 * c1 * c2))
    out = []
    with torch.no_grad():
        for chunk in rm.split(per):
            chunk_t = chunk.transpose(1, 2)
            u, v = power_iteration(lambda v, m=chunk_t: _row_times(v, m), lambda u, m=chunk: _row_times(u, m),
                                   (chunk.shape[0], c1), iters, rm.device)
            out.append((u, v, _bilinear(u, chunk, v)))
    if len(out) == 1:
        return out[0]
    return tuple(torch.cat(parts) for parts in zip(*out))


def spectral_norm(rm, iters=5):
    """Largest singular value of each matrix in ``rm`` (B x C1 x C2) by ``iters`` power iterations.

    Returns B values ``sigma = u^T RM v`` with ``u``, ``v`` detached, so the gradient with respect
    to ``RM`` is exactly ``u v^T`` (the gradient of the true norm when it has converged).
    """
    with fp32_math():
        rm32 = rm.float()
        u, v, _ = _rm_power_iteration(rm32.detach(), iters)
        return _bilinear(u, rm32, v)


def pair_sigma(x, y, iters=5):
    """``sigma(retention_matrix(x, y))`` per sample without building RM when that is cheaper.

    Equal (up to rounding) to ``spectral_norm(retention_matrix(x, y), iters)`` and with the same
    gradient. The power iteration runs on RM or on the factors, whichever :func:`_explicit` says
    is cheaper; ``sigma = (X^T u) . (Y^T v) / N`` is then evaluated on the factors (rank-one
    gradient).
    """
    with fp32_math():
        xf, yf, n = _factors(x, y)
        with torch.no_grad():
            if _explicit(xf.shape[1], yf.shape[1], n, iters):
                u, v, _ = _rm_power_iteration(torch.bmm(xf, yf.transpose(1, 2)) / n, iters)
            else:
                u, v = _factor_power_iteration(xf, yf, n, iters)
        return _rank_one_sigma(xf, yf, n, u, v)


# Multiply-adds a matrix product does in the time it takes to stream one float from main memory:
# about 8 on the 2-core CPU of the README's benchmark (25-50 GMAC/s in these products, 22 GB/s).
# GPUs have a higher ratio, which only favours forming RM more often than this rule does.
_MACS_PER_FLOAT = 8


def _explicit(c1, c2, n, iters):
    """Whether forming RM beats iterating on the factors X (C1 x N) and Y (C2 x N).

    Forming RM is a matrix product of ``N C1 C2`` multiply-adds, after which each of the
    ``2 iters`` products reads RM (``C1 C2`` floats); on the factors each product reads X and Y,
    ``N (C1 + C2)`` floats. The products are memory-bound, the formation is not.
    """
    passes = 2 * iters * _MACS_PER_FLOAT
    return c1 * c2 * (n + passes) <= passes * n * (c1 + c2)


def _projections(xf, yf, u, v):
    """``(X^T u, Y^T v)``: B x N each."""
    return _row_times(u, xf), _row_times(v, yf)


def _rank_one_sigma(xf, yf, n, u, v):
    """``sigma = (X^T u) . (Y^T v) / N`` with ``u``, ``v`` fixed: the gradient is rank one."""
    xu, yv = _projections(xf, yf, u, v)
    return (xu * yv).sum(dim=1) / n


def _pair_power_iterations(signs, reals, iters):
    """Top singular vectors of ``RM_B^k`` and ``sigma(RM_F^k)`` for every consecutive pair, no gradient.

    Retention matrices that are cheaper to form than to iterate on are formed once, straight
    into one buffer per shape, and the power iterations of all matrices of a shape (binary and
    real alike, all pairs) run as one batched iteration; the real side's sigma is read off its
    matrix. Pairs of wide layers with few positions iterate on the factors.
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
        c1, c2, n = fb[0].shape[1], fb[1].shape[1], fb[2]
        if _explicit(c1, c2, n, iters):
            groups.setdefault((c1, c2), []).extend([(k, "b", fb), (k, "f", ff)])
        else:
            uv_b[k] = _factor_power_iteration(*fb, iters)
            sig_f[k] = _rank_one_sigma(*ff, *_factor_power_iteration(*ff, iters))
    for (c1, c2), members in groups.items():
        b = members[0][2][0].shape[0]
        rms = members[0][2][0].new_empty(len(members) * b, c1, c2)
        for i, (_, _, (x, y, n)) in enumerate(members):
            torch.bmm(x, y.transpose(1, 2), out=rms[i * b:(i + 1) * b]).mul_(1.0 / n)
        u, v, sig = _rm_power_iteration(rms, iters)
        for i, (k, side, _) in enumerate(members):
            part = slice(i * b, (i + 1) * b)
            if side == "b":
                uv_b[k] = (u[part], v[part])
            else:
                sig_f[k] = sig[part]
    return factors_b, uv_b, sig_f


def _factor_power_iteration(xf, yf, n, iters):
    """Power iteration on ``RM = X Y^T / N`` through the factors, never forming RM."""
    xt, yt = xf.transpose(1, 2), yf.transpose(1, 2)
    return power_iteration(lambda v: _row_times(_row_times(v, yf), xt) / n,
                           lambda u: _row_times(_row_times(u, xf), yt) / n,
                           (xf.shape[0], xf.shape[1]), iters, xf.device)


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
    vectors. The sign's backward (:class:`modules.binary.SignEDE`) adds them to the activation's
    incoming gradient when the backward pass reaches it, instead of 2K activation-sized gradients
    waiting from the start of the backward pass.
    """

    def __init__(self):
        self.terms = []          # (coef B, vec_c B x C, vec_n B x N, spatial size of the term)
        self.scale = None        # d total / d L_LCR, set by the loss node's backward

    def add_to(self, grad):
        """``grad`` plus this activation's LCR gradient, all its outer products in one kernel, or None
        when there is nothing to add (no loss() call, or a backward pass that does not come from the
        LCR loss).

        A contiguous fp32 ``grad`` is updated in place and returned: it is the fresh gradient that
        autograd hands to the sign's backward, which nothing else holds (the LCR loss node
        contributes no tensor of its own to this activation).
        """
        if self.scale is None or not self.terms:
            return None
        b, c = grad.shape[:2]
        size = tuple(grad.shape[-2:])
        lefts, rights = [], []
        for coef, vec_c, vec_n, term_size in self.terms:
            lefts.append((coef * self.scale)[:, None] * vec_c)
            if tuple(term_size) != size:  # X was average-pooled: spread evenly over each window
                vec_n = _unpool(vec_n.view(b, 1, *term_size), size).view(b, -1)
            rights.append(vec_n)
        left, right = torch.stack(lefts, 2), torch.stack(rights, 1)
        if grad.dtype == torch.float32 and grad.is_contiguous():
            grad.view(b, c, -1).baddbmm_(left, right)
            return grad
        out = torch.baddbmm(grad.reshape(b, c, -1).float(), left, right)
        return out.view(grad.shape).to(grad.dtype)


def _unpool(grad, size):
    """Gradient of ``adaptive_avg_pool2d`` to ``grad``'s spatial size, from input size ``size``."""
    h, w = size
    fh, fw = h // grad.shape[-2], w // grad.shape[-1]
    if fh * grad.shape[-2] == h and fw * grad.shape[-1] == w:
        return grad.repeat_interleave(fh, dim=2).repeat_interleave(fw, dim=3) / (fh * fw)
    return torch.ops.aten._adaptive_avg_pool2d_backward(grad, grad.new_empty(*grad.shape[:2], h, w))


class _LCRLossNode(torch.autograd.Function):
    """Returns the precomputed ``L_LCR`` value; its backward hands ``d total / d L_LCR`` to the slots.

    The recorded activations are inputs only so that the backward pass reaches their
    sign nodes, whose backward then adds the actual gradient (:class:`modules.binary.SignEDE`).
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

    def _record(self, module, x):
        """The recorder: the signs of ``x`` with this activation's LCR gradient slot attached."""
        owner = module if isinstance(module, BinarizeConv2d) else self._last_conv
        slot = _DeferredGrad()
        x_bin = binary_sign(x, owner.t.to(x.device), owner.k.to(x.device), slot)
        self._records.setdefault(x.device, []).append((x, x_bin, slot))
        return x_bin

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
                anchors += [x_bin for _, x_bin, _ in chain]
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
