"""The Lipschitz continuity retention regulariser (LCR) of LCR-BNN, paper form.

For the binary layers ``1..K`` of a network, let ``A^{k-1}`` be the real input of layer ``k`` and
``A^K`` the real feature map that leaves the last binary block (the model marks it with an
:class:`LCRTap`); see docs/METHOD.md section 3. For each consecutive pair ``X = A^{k-1}``
(B x C1 x H1 x W1), ``Y = A^k`` (B x C2 x H2 x W2)::

    X <- avg_pool(X) to H2 x W2          (only when H1 > H2)
    RM = X_flat @ Y_flat^T / N            N = H2 * W2, one C1 x C2 retention matrix per sample

``RM_F^k`` uses the real activations, ``RM_B^k`` their signs. The Lipschitz estimate of layer ``k``
is the largest singular value ``sigma(RM)`` of each sample's matrix (:mod:`modules.singular`), and::

    r_kb  = sigma(RM_B^k[b]) / sigma(RM_F^k[b])
    L_LCR = 1 / (K B) * sum_k sum_b (r_kb - 1) ** 2
    L     = CE + alpha * LCR_SCALE * L_LCR

Its gradient, written out (``u``, ``v``: the top singular vectors of ``RM_B^k[b]``; ``sigma_F`` as a
constant first)::

    d L_LCR / d sigma_B = 2 (r - 1) / (sigma_F K B)
    d sigma_B / d RM_B  = u v^T
    d sigma_B / d X_B   = u (Y_B^T v)^T / N      (spread evenly over each pooling window)
    d sigma_B / d Y_B   = v (X_B^T u)^T / N

``X_B = sign(X)`` has no gradient of its own; the sign is passed with a surrogate (``SURROGATES``):

    d L_LCR / d X = d L_LCR / d X_B * (1 - tanh(X)^2)              ("tanh", the default)
    d L_LCR / d X = d L_LCR / d X_B * k t (1 - tanh(t X)^2)        ("ede", the layer's own EDE)

With ``sigma_f="differentiable"`` (``SIGMA_F``; the default, a deviation from the method as written,
docs/METHOD.md section 3) the real activations also receive the gradient through ``sigma_F``, with no
surrogate (``u_F``, ``v_F``: the top singular vectors of ``RM_F^k[b]``); with "detached" they do not::

    d L_LCR / d sigma_F = -2 (r - 1) r / (sigma_F K B)
    d sigma_F / d X     = u_F (Y^T v_F)^T / N,     d sigma_F / d Y = v_F (X^T u_F)^T / N

:class:`LipschitzRegularizer` computes the value without an autograd graph and delivers this
gradient, two small vectors per activation and pair, through a tensor hook on each recorded
activation (``X`` for "tanh", ``X_B`` for "ede") when the backward pass reaches it; nothing
activation-sized waits between the forward and the backward pass.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import speed
from modules.binary import BinarizeConv2d, binary_sign
from modules.singular import top_singular

__all__ = ["LCR_SCALE", "SIGMA_F", "SURROGATES", "LCRTap", "retention_matrix", "top_singular_of_pairs",
           "times_tanh_slope_", "LipschitzRegularizer"]

# c in  L = CE + alpha * c * L_LCR. At initialisation L_LCR is 0.17 for binary ResNet-20 and the
# ImageNet ResNet-18 (per-layer sigma_B/sigma_F 1.2 .. 1.6), 0.35 for the CIFAR ResNet-18 and 0.55 for
# VGG-Small, so c = 0.06 puts the LCR share of the total loss at the recommended --alpha 8 between 1
# and 10 per cent (python -m tools.lcr_share; docs/RESULTS.md section 6). With c = 0.2 the LCR
# gradient in the first stage was about half of CE's at initialisation and binary ResNet-20 on
# `digits` stayed below 25 % top-1 after 6 epochs.
LCR_SCALE = 0.06

# How the LCR gradient passes the sign function on its way to the real activation A (docs/METHOD.md
# section 3): "tanh" with d tanh(A)/dA, the EDE's shape at t = k = 1, fixed for the whole run; "ede"
# with the layer's own EDE k t (1 - tanh(t A)^2), whose peak k t = max(1, t) grows to Tmax = 10 by
# the end of training. The default is "tanh": with "ede" the paper form collapsed late in training at alpha 8
# and 16 on digits (docs/RESULTS.md).
SURROGATES = ("tanh", "ede")

# Whether sigma_F passes its gradient into the real activations ("differentiable", the default, a
# deviation) or is a constant of the loss ("detached", the method as the paper gives it). With
# sigma_F detached nothing stops the LCR gradient from shrinking the real activations: sigma_B,
# computed from their signs, does not depend on their scale, while sigma_F falls with it, so the
# ratio can grow without bound; on digits it did, and alpha 16 diverged (docs/RESULTS.md section 2).
SIGMA_F = ("detached", "differentiable")


class LCRTap(nn.Identity):
    """Identity that marks the real feature map leaving a model's last binary block (``A^K``)."""


def fp32_math():
    """A context in which autocast is off on every device, so the LCR maths runs in fp32."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def pool_to(x, size):
    """Average-pool ``x`` (B x C x H x W) to ``size`` (H2, W2), as ``F.adaptive_avg_pool2d``.

    Speed trick: when the windows tile ``x`` exactly, the pool is a sum of slices (first whole input
    rows, then neighbours in a row); ``python -m tools.bench_tricks`` (ResNet-20 at batch 128, one
    thread): 2.8 against 6.4 ms per step, under 1 % of the step.
    """
    (h1, w1), (h2, w2) = x.shape[-2:], tuple(size)
    if (h1, w1) == (h2, w2):
        return x
    if h1 < h2 or w1 < w2:
        raise ValueError(f"retention matrix needs X at least as large as Y, got {tuple(x.shape)} vs {(h2, w2)}")
    fh, fw = h1 // h2, w1 // w2
    if not speed.enabled("pool") or fh * h2 != h1 or fw * w2 != w1 or not x.is_contiguous():
        return F.adaptive_avg_pool2d(x, (h2, w2))
    rows = x.reshape(-1, fh, w1)
    out = rows[:, 0] * (1.0 / (fh * fw))
    for i in range(1, fh):
        out.add_(rows[:, i], alpha=1.0 / (fh * fw))
    cols = out.view(-1, fw)
    pooled = cols[:, 0].clone()
    for j in range(1, fw):
        pooled.add_(cols[:, j])
    return pooled.view(*x.shape[:-2], h2, w2)


def _flat_pair(x, y):
    """``(X_flat, Y_flat, N)``: X pooled to Y's spatial size, both flattened to B x C x N, in fp32."""
    return pool_to(x.float(), y.shape[-2:]).flatten(2), y.flatten(2).float(), y.shape[-2] * y.shape[-1]


def retention_matrix(x, y):
    """``RM = pool(X)_flat @ Y_flat^T / N``: B x C1 x C2 for X (B x C1 x H1 x W1), Y (B x C2 x H2 x W2)."""
    xf, yf, n = _flat_pair(x, y)
    return torch.bmm(xf, yf.transpose(1, 2)) / n


def top_singular_of_pairs(pairs, steps=None, block=None):
    """``(sigma, u, v)`` of the retention matrix of every ``(X_flat, Y_flat, N)`` in ``pairs`` (a list);
    ``steps`` and ``block`` as :func:`modules.singular.top_singular` (None: its defaults by size).

    The plain path forms each ``RM = X Y^T / N`` and calls :func:`modules.singular.top_singular` on
    it. Speed trick: matrices of the same shape are formed straight into one buffer and solved in
    one call, which replaces dozens of small kernels by a few larger ones without a copy; the buffer
    holds ``X Y^T`` and each sigma is divided by its N afterwards (singular vectors do not depend on
    the scale), which saves a pass over the buffer (``python -m tools.bench_tricks``, ResNet-20 at
    batch 128, one thread: see ``group`` in docs/RESULTS.md section 5).
    """
    if not speed.enabled("group"):
        return [top_singular(torch.bmm(x, y.transpose(1, 2)) / n, steps, block) for x, y, n in pairs]
    groups = {}
    for i, (x, y, _) in enumerate(pairs):
        groups.setdefault((x.shape[1], y.shape[1]), []).append(i)
    out = [None] * len(pairs)
    for (c1, c2), members in groups.items():
        sizes = [pairs[i][0].shape[0] for i in members]
        buffer = pairs[members[0]][0].new_empty(sum(sizes), c1, c2)
        for i, part in zip(members, buffer.split(sizes)):
            x, y, _ = pairs[i]
            torch.bmm(x, y.transpose(1, 2), out=part)      # X Y^T: the 1 / N goes to sigma below
        sigma, u, v = top_singular(buffer, steps, block)
        for i, part_sigma, part_u, part_v in zip(members, sigma.split(sizes), u.split(sizes), v.split(sizes)):
            out[i] = (part_sigma / pairs[i][2], part_u, part_v)
    return out


class _RankOneGrad:
    """The LCR gradient with respect to one recorded activation, kept as outer products.

    Its ``terms`` are ``(left B x C, right B x N, spatial size of the term)``, each the gradient
    ``left_b right_b^T`` of one pair with respect to the sign activation (the module docstring's
    ``u (Y^T v)^T / N`` or ``v (X^T u)^T / N``, already multiplied by ``d L_LCR / d sigma_B``). Called as
    a tensor hook, it returns the incoming gradient plus ``scale`` times the sum of its terms, where
    ``scale`` is ``d total / d L_LCR``, set when the backward pass leaves the loss (:class:`_LCRLoss`).

    With ``real`` None the hook sits on the sign activation, and the layer's EDE carries the sum to
    the real input (surrogate ``ede``). With ``real`` the real input ``A``, the hook sits on ``A`` and
    the sum is multiplied by ``d tanh(A) / dA = 1 - tanh(A)^2`` on the way (surrogate ``tanh``).
    """

    def __init__(self, terminal, real=None):
        self.terms = []
        self.real_terms = []     # gradient through sigma_F, with respect to the real activation itself
        self.scale = None
        self.terminal = terminal  # nothing but the LCR loss consumes this activation (the tap's signs)
        self.real = real

    def __call__(self, grad):
        if self.scale is None or not self.terms:
            return None          # a backward pass that does not come from the LCR loss
        if self.real is None:      # surrogate "ede": the layer's EDE carries the sum on from the sign
            return _add_outer_products(grad.float(), self.terms, self.scale, grad.shape, fresh=True).to(grad.dtype)
        lcr = times_tanh_slope_(_add_outer_products(None, self.terms, self.scale, grad.shape), self.real.float())
        return _add_outer_products(lcr.add_(grad), self.real_terms, self.scale, grad.shape).to(grad.dtype)


def _add_outer_products(out, terms, scale, shape, fresh=False):
    """``out + scale * sum_terms left_b right_b^T`` (B x C x N, viewed as ``shape``): written into ``out``,
    which the caller owns, or, with ``fresh`` (or ``out`` None), into a new tensor that leaves ``out``
    untouched (with no terms at all: ``out`` itself). A term whose right side has a smaller spatial size
    came from a pooled X and is spread evenly over each pooling window."""
    b, size = shape[0], tuple(shape[-2:])
    out = None if out is None else out.view(b, shape[1], -1)
    for left, right, term_size in terms:
        if tuple(term_size) != size:
            right = _unpool(right.view(b, 1, *term_size), size).view(b, -1)
        left, right = (left * scale).unsqueeze(2), right.unsqueeze(1)
        if out is None:
            out = left * right
        elif fresh:                  # the first term leaves the caller's ``out`` untouched
            out, fresh = torch.addcmul(out, left, right), False
        else:
            out.addcmul_(left, right)
    return out if out is None else out.view(shape)


def times_tanh_slope_(grad, x):
    """``grad * d tanh(x)/dx = grad * (1 - tanh(x)^2)``, elementwise, written into ``grad`` (which the
    caller owns; never a gradient autograd handed in) and returned.

    Speed trick: the same function computed as ``4 grad s (1 - s)`` with ``s = sigmoid(2x)`` (since
    ``tanh(x) = 2 sigmoid(2x) - 1``) in one buffer, because ``torch.tanh`` took about 6 times as long
    as ``torch.sigmoid`` on the development CPU and a fresh activation-sized buffer costs several
    in-place passes over it (docs/RESULTS.md section 5); ``python -m tools.bench_tricks`` (ResNet-20
    at batch 128, one thread): 71 against 137 ms per step.
    """
    if not speed.enabled("slope"):
        return grad.mul_(1 - torch.tanh(x) ** 2)
    s = torch.mul(x, 2).sigmoid_()
    return torch.ops.aten.sigmoid_backward.grad_input(grad, s, grad_input=grad).mul_(4)


def _unpool(grad, size):
    """Gradient of ``adaptive_avg_pool2d`` from ``grad``'s spatial size back to input size ``size``."""
    h, w = size
    fh, fw = h // grad.shape[-2], w // grad.shape[-1]
    if fh * grad.shape[-2] == h and fw * grad.shape[-1] == w:
        return grad.repeat_interleave(fh, dim=2).repeat_interleave(fw, dim=3) / (fh * fw)
    return torch.ops.aten._adaptive_avg_pool2d_backward(grad, grad.new_empty(*grad.shape[:2], h, w))


class _LCRLoss(torch.autograd.Function):
    """Returns the precomputed ``L_LCR``; its backward hands ``d total / d L_LCR`` to the slots.

    The hooked activations are inputs so that the backward pass reaches them only after this node,
    when every slot knows its scale. The tap's activation gets a zero gradient here, so that its hook
    runs even when nothing else consumes it (its signs) or sends it a gradient (a loss of L_LCR alone).
    """

    @staticmethod
    def forward(ctx, slots, value, *signs):
        ctx.slots = slots
        ctx.shapes = [(s.shape, s.dtype, s.device) if slot.terminal else None for slot, s in zip(slots, signs)]
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        for slot in ctx.slots:
            slot.scale = grad.float()
        zeros = [None if meta is None else torch.zeros(meta[0], dtype=meta[1], device=meta[2])
                 for meta in ctx.shapes]
        return (None, None, *zeros)


class LipschitzRegularizer:
    """Records a model's activations during one forward pass and turns them into ``L_LCR``.

    Usage::

        reg = LipschitzRegularizer(model)
        with reg.record():
            logits = model(x)
        lcr, logs = reg.loss()          # logs["sigma_ratio"]: per-layer mean sigma_B / sigma_F
        total = ce + alpha * reg.weight_scale * lcr

    The chain is the input of every :class:`BinarizeConv2d` (in forward order) and the output of
    the model's :class:`LCRTap`, recorded by forward hooks on each layer's ``input_quantizer``
    that exist only inside :meth:`record`: with ``--alpha 0`` nothing is recorded and nothing is
    computed. Works through DataParallel (activations are grouped per device, each replica's
    chain in forward order) and DDP.
    """

    weight_scale = LCR_SCALE

    def __init__(self, model, steps=None, surrogate="tanh", sigma_f="differentiable", block=None):
        if steps is not None and steps < 1:
            raise ValueError(f"block power steps must be >= 1, got {steps}")
        if block is not None and block < 1:
            raise ValueError(f"the power iteration needs a block of at least 1 vector, got {block}")
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        if sigma_f not in SIGMA_F:
            raise ValueError(f"sigma_f must be one of {SIGMA_F}, got {sigma_f!r}")
        if sigma_f == "differentiable" and surrogate != "tanh":
            raise ValueError("a differentiable sigma_F needs the tanh surrogate (its hooks sit on the real "
                             "activations)")
        self.sigma_f = sigma_f
        self.surrogate = surrogate   # how the LCR gradient passes the sign: see _RankOneGrad
        self.steps = steps           # None: the size-dependent default of modules.singular
        self.block = block           # vectors per block; None: the same default
        convs = [m for m in model.modules() if isinstance(m, BinarizeConv2d)]
        taps = [m for m in model.modules() if isinstance(m, LCRTap)]
        if not convs or len(taps) != 1:
            raise ValueError(f"LipschitzRegularizer needs a model with BinarizeConv2d layers and one LCRTap, "
                             f"got {len(convs)} and {len(taps)}")
        self.quantizers = [m.input_quantizer for m in convs]
        self.tap = taps[0]
        self._last_conv = convs[-1]
        self._records = {}

    def parameters(self):
        """The paper form has no trainable parameters of its own."""
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        """Nothing to restore (the official form has gamma)."""

    def _keep(self, x, x_bin, terminal):
        """Record one chain activation ``(A, sign(A))`` and hook the tensor its LCR gradient enters."""
        if self.surrogate == "tanh":
            slot, anchor = _RankOneGrad(terminal, real=x.detach()), x
            x_bin = x_bin.detach()
        else:
            slot, anchor = _RankOneGrad(terminal), x_bin
        if anchor.requires_grad:
            anchor.register_hook(slot)
        self._records.setdefault(x.device, []).append((x, x_bin, slot, anchor))

    def _on_sign(self, module, inputs, x_bin):
        self._keep(inputs[0], x_bin, terminal=False)

    def _on_tap(self, module, inputs, out):
        x = inputs[0]
        last = self._last_conv
        self._keep(x, binary_sign(x, last.t.to(x.device), last.k.to(x.device)), terminal=True)

    @contextlib.contextmanager
    def record(self):
        """Hook the chain's layers for the duration of the block."""
        self._records = {}
        handles = [q.register_forward_hook(self._on_sign) for q in self.quantizers]
        handles.append(self.tap.register_forward_hook(self._on_tap))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def loss(self):
        """``(L_LCR, logs)`` of the last recorded forward pass: a scalar with the gradient of the
        module docstring, and ``{"sigma_ratio": per-layer mean sigma_B / sigma_F}`` (detached)."""
        if not self._records:
            raise RuntimeError("LipschitzRegularizer.loss() needs a forward pass inside record()")
        chains, self._records = list(self._records.values()), {}
        if any(len(chain) < 2 for chain in chains):
            raise RuntimeError("the LCR chain needs at least two recorded activations")
        out = chains[0][0][0].device
        total = sum(len(chain[0][0]) for chain in chains)
        with torch.no_grad(), fp32_math():
            ratio = torch.cat([self._chain_ratios(chain, total).to(out) for chain in chains], dim=1)
            value = ((ratio - 1) ** 2).mean()
        # slots and their hooked tensors in the same order, chain by chain (DataParallel replicas
        # record concurrently, so arrival order interleaves devices)
        slots = [slot for chain in chains for _, _, slot, _ in chain]
        anchors = [anchor for chain in chains for _, _, _, anchor in chain]
        return _LCRLoss.apply(slots, value, *anchors), {"sigma_ratio": ratio.mean(dim=1)}

    def _chain_ratios(self, chain, total):
        """``sigma_B / sigma_F`` (K x B) of one device's chain; gives each slot its gradient terms."""
        reals = [record[0] for record in chain]
        signs = [record[1] for record in chain]
        k_pairs = len(chain) - 1
        pairs_b = [_flat_pair(signs[k], signs[k + 1]) for k in range(k_pairs)]
        pairs_f = [_flat_pair(reals[k], reals[k + 1]) for k in range(k_pairs)]
        solved = top_singular_of_pairs(pairs_b + pairs_f, self.steps, self.block)
        ratios = []
        for k, ((xf, yf, n), (sigma_b, u, v), (sigma_f, u_f, v_f)) in enumerate(
                zip(pairs_b, solved[:k_pairs], solved[k_pairs:])):
            sigma_f = sigma_f.clamp_min(1e-12)
            ratio = sigma_b / sigma_f
            d_sigma_b = 2 * (ratio - 1) / (sigma_f * k_pairs * total)
            size = signs[k + 1].shape[-2:]
            slot_x, slot_y = chain[k][2], chain[k + 1][2]
            _add_pair_terms(slot_x.terms, slot_y.terms, d_sigma_b, u, v, xf, yf, n, size)
            if self.sigma_f == "differentiable":     # d L / d sigma_F = -d L / d sigma_B * ratio
                xf_f, yf_f, _ = pairs_f[k]
                _add_pair_terms(slot_x.real_terms, slot_y.real_terms, -d_sigma_b * ratio, u_f, v_f, xf_f, yf_f, n,
                                size)
            ratios.append(ratio)
        return torch.stack(ratios)


def _add_pair_terms(terms_x, terms_y, d_sigma, u, v, xf, yf, n, size):
    """Append to the term lists of X and Y the gradient ``d_sigma * d sigma / d X`` and ``... / d Y`` of
    one pair as outer products: ``u (Y^T v)^T / N`` and ``v (X^T u)^T / N`` (module docstring)."""
    y_v = torch.bmm(v.unsqueeze(1), yf).squeeze(1) / n       # Y^T v / N, B x N
    x_u = torch.bmm(u.unsqueeze(1), xf).squeeze(1) / n       # X^T u / N, B x N
    terms_x.append((d_sigma[:, None] * u, y_v, size))
    terms_y.append((d_sigma[:, None] * v, x_u, size))
