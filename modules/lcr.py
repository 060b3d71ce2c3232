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
           "pair_sigma", "LipschitzRegularizer"]

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


def spectral_norm(rm, iters=5):
    """Largest singular value of each matrix in ``rm`` (B x C1 x C2) by ``iters`` power iterations.

    Returns B values ``sigma = u^T RM v`` with ``u``, ``v`` detached, so the gradient with respect
    to ``RM`` is exactly ``u v^T`` (the gradient of the true norm when it has converged).
    """
    rm32 = rm.float()
    u, v = power_iteration(lambda v: torch.bmm(rm32, v.unsqueeze(2)).squeeze(2),
                           lambda u: torch.bmm(u.unsqueeze(1), rm32).squeeze(1),
                           (rm.shape[0], rm.shape[1]), iters, rm.device)
    return torch.einsum("bi,bij,bj->b", u, rm32, v)


def pair_sigma(x, y, iters=5):
    """``sigma(retention_matrix(x, y))`` per sample without building RM when that is cheaper.

    Equal (up to rounding) to ``spectral_norm(retention_matrix(x, y), iters)`` and with the same
    gradient. Forming RM costs ``N C1 C2`` per sample; iterating on the factors costs
    ``2 N (C1 + C2)`` per iteration, so the cheaper of the two is used for the power iteration.
    ``sigma = (X^T u) . (Y^T v) / N`` is then evaluated on the factors (rank-one gradient).
    """
    xf, yf, n = _factors(x, y)
    b, c1, c2 = xf.shape[0], xf.shape[1], yf.shape[1]
    with torch.no_grad():
        if c1 * c2 <= 2 * iters * (c1 + c2):
            rm = torch.bmm(xf, yf.transpose(1, 2)) / n
            matvec = lambda v: torch.bmm(rm, v.unsqueeze(2)).squeeze(2)  # noqa: E731
            rmatvec = lambda u: torch.bmm(u.unsqueeze(1), rm).squeeze(1)  # noqa: E731
        else:
            matvec = lambda v: torch.bmm(xf, torch.bmm(v.unsqueeze(1), yf).transpose(1, 2)).squeeze(2) / n  # noqa: E731
            rmatvec = lambda u: torch.bmm(yf, torch.bmm(u.unsqueeze(1), xf).transpose(1, 2)).squeeze(2) / n  # noqa: E731
        u, v = power_iteration(matvec, rmatvec, (b, c1), iters, xf.device)
    xu = torch.bmm(u.unsqueeze(1), xf).squeeze(1)
    yv = torch.bmm(v.unsqueeze(1), yf).squeeze(1)
    return (xu * yv).sum(dim=1) / n


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
        self._records.setdefault(x.device, []).append((x, x_bin))

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

    def _chain_sigmas(self, chain):
        """Per-pair ``sigma_B`` (with gradient) and ``sigma_F`` (detached), each K x B."""
        real = [x for x, _ in chain]
        signs = [xb if xb is not None else binary_sign(x, self._last_conv.t.to(x.device),
                                                         self._last_conv.k.to(x.device))
                 for x, xb in chain]
        sig_b, sig_f = [], []
        for k in range(len(chain) - 1):
            sig_b.append(pair_sigma(signs[k], signs[k + 1], self.iters))
            with torch.no_grad():
                sig_f.append(pair_sigma(real[k], real[k + 1], self.iters))
        return torch.stack(sig_b), torch.stack(sig_f)

    def loss(self):
        """Unweighted ``L_LCR`` (scalar tensor with gradient) from the last recorded forward pass."""
        if not self._records:
            raise RuntimeError("LipschitzRegularizer.loss() needs a forward pass inside record()")
        ratios = []
        out_device = None
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            for device, chain in self._records.items():
                if len(chain) < 2:
                    raise RuntimeError("the LCR chain needs at least two recorded activations")
                out_device = out_device or device
                sig_b, sig_f = self._chain_sigmas(chain)
                ratios.append((sig_b / sig_f.clamp_min(1e-12)).to(out_device))
        self._records = {}
        ratio = torch.cat(ratios, dim=1)
        self._ratios = ratio.detach().mean(dim=1)
        return ((ratio - 1) ** 2).mean()

    def stats(self):
        """Per-layer mean ``sigma_B / sigma_F`` (K values, detached) of the last :meth:`loss` call."""
        return self._ratios
