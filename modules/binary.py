"""IR-Net binary convolution: the sign function with the EDE backward, and ``BinarizeConv2d``.

Forward of a binary layer (docs/METHOD.md section 1), for latent weight ``W`` (out, in, kh, kw) and
real input activation ``a``::

    w_hat_o = (W_o - mean(W_o)) / std(W_o)              # balance + standardise each filter (Libra-PB)
    s_o     = 2 ** round(log2(mean(|w_hat_o|)))          # power-of-two scale, not differentiated
    y       = conv2d(sign(a), sign(w_hat) * s)

``sign(0) = +1`` so binary tensors are truly two-valued ({-1, +1}); ``torch.sign`` would give 0.

Backward of sign is IR-Net's error decay estimator (EDE), the derivative of ``k * tanh(t * x)``::

    dL/dx = dL/dy * k * t * (1 - tanh(t * x) ** 2)

with ``t = Tmin * (Tmax / Tmin) ** (epoch / epochs)`` and ``k = max(1 / t, 1)`` set once per epoch
by :func:`set_ede_schedule` (Qin et al., "Forward and Backward Information Retention for Accurate
Binary Neural Networks", CVPR 2020).

A binary layer is its two signs, their EDE and its convolution, and nothing else. Whatever observes
it (a loss built on its activations, a profiler) attaches forward hooks to the named input
quantiser :attr:`BinarizeConv2d.input_quantizer` from outside.
"""
import math

import torch
import torch.nn as nn

from modules import speed

__all__ = ["SignEDE", "binary_sign", "BinaryActivation", "BinarizeConv2d", "ede_parameters",
           "set_ede_schedule"]


def two_valued_sign(x):
    """``where(x >= 0, 1, -1)`` in ``x``'s dtype: ``sign`` with ``sign(0) = +1``.

    Speed trick: ``sign(sign(x) + 0.5)`` maps -0.0, 0 and every x > 0 to +1 and x < 0 to -1 in one
    allocation (``python -m tools.bench_tricks``, ResNet-20's chain at batch 128, one thread: 55
    against 149 ms per step's activations). ``tests/test_binary.py`` checks both paths on zeros,
    subnormals and infinities.
    """
    if not speed.enabled("sign"):
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    return torch.sign(x).add_(0.5).sign_()


class SignEDE(torch.autograd.Function):
    """``y = sign(x)`` with ``sign(0) = +1``; backward ``dx = dy * k * t * (1 - tanh(t x)^2)``.

    ``t`` and ``k`` are 0-dim tensors (the layer's buffers), so changing them never recompiles or
    reallocates anything. Value at 0: +1; gradient at 0: ``k t``. Call through :meth:`apply`
    (or :func:`binary_sign`).
    """

    @staticmethod
    def forward(ctx, x, t, k):
        ctx.save_for_backward(x, t, k)
        return two_valued_sign(x)

    @staticmethod
    def backward(ctx, grad_out):
        x, t, k = ctx.saved_tensors
        # k t (1 - tanh(t x)^2) dL/dy, built in place on one fresh tensor (never on grad_out)
        ede = torch.mul(x, t.to(x.dtype)).tanh_()
        ede = ede.mul_(ede).sub_(1).mul_(-(k * t).to(x.dtype))
        return ede.mul_(grad_out), None, None


def binary_sign(x, t, k):
    """Functional form of :class:`SignEDE`: ``sign(x)`` in {-1, +1} with the EDE gradient."""
    return SignEDE.apply(x, t, k)


class BinaryActivation(nn.Module):
    """The input quantiser of a :class:`BinarizeConv2d`: ``forward(x, t, k) = binary_sign(x, t, k)``.

    It holds no state (``t`` and ``k`` are the layer's buffers, passed in), so it adds nothing to
    state dicts. It exists as a named submodule so that observers can attach forward hooks to it:
    a hook sees the layer's real input ``x`` and its signs.
    """

    def forward(self, x, t, k):
        return binary_sign(x, t, k)


class BinarizeConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose input and weight are binarised as in IR-Net (see the module docstring).

    Same constructor as ``nn.Conv2d``. Buffers ``t`` and ``k`` hold the EDE parameters (saved in
    checkpoints, moved with ``.to()``); ``input_quantizer`` takes the signs of the input.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("t", torch.tensor(1.0))
        self.register_buffer("k", torch.tensor(1.0))
        self.input_quantizer = BinaryActivation()

    def binary_weight(self):
        """``sign(w_hat) * s`` as a tensor of the weight's shape; differentiable through ``w_hat``."""
        w = self.weight.flatten(1)
        w_hat = (w - w.mean(dim=1, keepdim=True)) / w.std(dim=1, keepdim=True)
        with torch.no_grad():
            scale = torch.pow(2.0, torch.round(torch.log2(w_hat.abs().mean(dim=1, keepdim=True))))
        return (binary_sign(w_hat, self.t, self.k) * scale).view_as(self.weight)

    def forward(self, x):
        x_bin = self.input_quantizer(x, self.t, self.k)
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
