"""IR-Net binary convolution: the sign function with the EDE backward, and ``BinarizeConv2d``.

Forward of a binary layer (METHOD.md section 1), for latent weight ``W`` (out, in, kh, kw) and real
input activation ``a``::

    w_hat_o = (W_o - mean(W_o)) / std(W_o)              # balance + standardise each filter (Libra-PB)
    s_o     = 2 ** round(log2(mean(|w_hat_o|)))          # power-of-two scale, not differentiated
    y       = conv2d(sign(a), sign(w_hat) * s)

``sign(0) = +1`` so binary tensors are truly two-valued ({-1, +1}); ``torch.sign`` would give 0.

Backward of sign is IR-Net's error decay estimator (EDE), the derivative of ``k * tanh(t * x)``::

    dL/dx = dL/dy * k * t * (1 - tanh(t * x) ** 2)

with ``t = Tmin * (Tmax / Tmin) ** (epoch / epochs)`` and ``k = max(1 / t, 1)`` set once per epoch
by :func:`set_ede_schedule` (Qin et al., "Forward and Backward Information Retention for Accurate
Binary Neural Networks", CVPR 2020).
"""
import math

import torch
import torch.nn as nn

__all__ = ["SignEDE", "binary_sign", "BinarizeConv2d", "ede_parameters", "set_ede_schedule"]


class SignEDE(torch.autograd.Function):
    """``y = sign(x)`` with ``sign(0) = +1``; backward ``dx = dy * k * t * (1 - tanh(t x)^2)``.

    ``t`` and ``k`` are 0-dim tensors (the layer's buffers), so changing them never recompiles or
    reallocates anything. Call through :meth:`apply` (or :func:`binary_sign`).

    ``extra``: optional object with ``add_to(grad) -> grad + more`` (or None), which the backward
    calls on ``dy`` before the EDE factor; the Lipschitz regulariser adds its gradient with respect
    to ``y`` this way, fused into this backward instead of a separate pass over ``dy``.
    """

    @staticmethod
    def forward(ctx, x, t, k, extra=None):
        ctx.save_for_backward(x, t, k)
        ctx.extra = extra
        # sign(sign(x) + 0.5) maps -0.0, 0 and every x > 0 to +1, x < 0 to -1: the same tensor as
        # where(x >= 0, 1, -1) (NaN stays NaN), in one allocation; on CPU about 4x faster
        return torch.sign(x).add_(0.5).sign_()

    @staticmethod
    def backward(ctx, grad_out):
        x, t, k = ctx.saved_tensors
        # d = k t (1 - tanh(t x)^2), computed in place: two allocations in all instead of six
        d = torch.mul(x, t.to(x.dtype)).tanh_()
        d = d.mul_(d).sub_(1).mul_(-(k * t).to(x.dtype))
        grad = ctx.extra.add_to(grad_out) if ctx.extra is not None else None
        if grad is None:
            return grad_out * d, None, None, None
        return grad.mul_(d), None, None, None


def binary_sign(x, t, k, extra=None):
    """Functional form of :class:`SignEDE`: ``sign(x)`` in {-1, +1} with the EDE gradient."""
    return SignEDE.apply(x, t, k, extra)


class BinarizeConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose input and weight are binarised as in IR-Net (see the module docstring).

    Same constructor as ``nn.Conv2d``. Buffers ``t`` and ``k`` hold the EDE parameters (saved in
    checkpoints, moved with ``.to()``). The layer hides nothing else: the Lipschitz regulariser
    reads the layer's real input through :attr:`recorder`, a callable ``recorder(layer, x) -> x_bin``
    that is ``None`` unless a :class:`modules.lcr.LipschitzRegularizer` is recording, so recording
    costs nothing when it is off. (The regulariser takes the signs itself, with its gradient
    attached to the sign's backward, and hands them back for the convolution.) ``lcr_chain`` says
    whether the layer is on the main path that the regulariser follows (binary 1x1 shortcut
    convolutions, if a model has any, set it to False).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("t", torch.tensor(1.0))
        self.register_buffer("k", torch.tensor(1.0))
        self.lcr_chain = True
        self.recorder = None

    def binary_weight(self):
        """``sign(w_hat) * s`` as a tensor of the weight's shape; differentiable through ``w_hat``."""
        w = self.weight.flatten(1)
        w_hat = (w - w.mean(dim=1, keepdim=True)) / w.std(dim=1, keepdim=True)
        with torch.no_grad():
            scale = torch.pow(2.0, torch.round(torch.log2(w_hat.abs().mean(dim=1, keepdim=True))))
        return (binary_sign(w_hat, self.t, self.k) * scale).view_as(self.weight)

    def forward(self, x):
        if self.recorder is None:
            x_bin = binary_sign(x, self.t, self.k)
        else:
            x_bin = self.recorder(self, x)
        # nn.Conv2d's own path, so padding_mode ('zeros', 'reflect', ...) applies to the signs
        return self._conv_forward(x_bin, self.binary_weight(), self.bias)


def ede_parameters(epoch, epochs, t_min=1e-3, t_max=10.0):
    """``(t, k)`` for ``epoch`` in ``0 .. epochs-1``: ``t = Tmin (Tmax/Tmin)^(epoch/epochs)``, ``k = max(1/t, 1)``."""
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    t = t_min * math.pow(t_max / t_min, epoch / epochs)
    return t, max(1.0 / t, 1.0)


def set_ede_schedule(model, epoch, epochs, t_min=1e-3, t_max=10.0):
    """Set ``t`` and ``k`` of every :class:`BinarizeConv2d` in ``model`` (any depth, DP/DDP wrappers too).

    Returns ``(t, k)`` so callers can log them.
    """
    t, k = ede_parameters(epoch, epochs, t_min, t_max)
    for m in model.modules():
        if isinstance(m, BinarizeConv2d):
            m.t.fill_(t)
            m.k.fill_(k)
    return t, k
