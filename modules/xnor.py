"""Packed 1-bit weights and a reference XNOR-popcount convolution for deployed binary layers.

A trained :class:`~modules.binary.BinarizeConv2d` computes ``conv2d(sign(a), sign(w_hat) * s)`` with
``s = 2 ** e`` per output filter (METHOD.md section 1). At inference only the signs and ``e`` matter,
so a deployed layer keeps:

- ``bits``: the weight signs of each output filter, flattened over ``in/groups * kh * kw`` in
  ``weight.flatten(1)`` order, bit 1 for +1 and bit 0 for -1, packed 8 per byte with the first
  element in the most significant bit; the last byte of a filter is padded with 0 bits;
- ``shape``: the weight shape ``(out, in/groups, kh, kw)``, kept beside the bits;
- ``exponent``: ``e`` per filter as int8.

With activation bits ``x_b = [a >= 0]`` (``sign(0) = +1``, as in training) and weight bits ``w_b``,
the dot product of one receptive field of ``n`` valid positions is::

    sum(sign(a) * sign(w)) = 2 * popcount(XNOR(x_b, w_b) AND valid) - n

Zero padding pads the *signed* input in training (``F.conv2d`` on ``sign(a)``), so padded positions
contribute 0, not +-1: they are removed by the ``valid`` mask and not counted in ``n``. The integer
dot is exact in float32 (``|dot| <= in/groups * kh * kw < 2**24``) and so is its product with a power
of two, which makes both paths of :class:`PackedBinaryConv2d` bit-identical to the training layer
before any affine that follows.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

__all__ = ["pack_signs", "unpack_signs", "popcount_uint8", "xnor_popcount_conv2d", "xnor_conv2d",
           "PackedBinaryConv2d", "set_xnor_reference"]

_BIT_WEIGHTS = [128, 64, 32, 16, 8, 4, 2, 1]


def _pack_rows(bits):
    """Pack a (..., n) bool tensor into (..., ceil(n / 8)) uint8, first element in the top bit."""
    n = bits.shape[-1]
    pad = (-n) % 8
    if pad:
        bits = F.pad(bits.to(torch.uint8), (0, pad))
    grouped = bits.to(torch.uint8).reshape(*bits.shape[:-1], -1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    # Each byte's bits are disjoint, so the sum never exceeds 255 and stays exact in uint8.
    return (grouped * weights).sum(dim=-1, dtype=torch.uint8)


def pack_signs(w):
    """Pack the signs of ``w`` (out, ...) into uint8 (out, ceil(prod(...) / 8)).

    ``w`` is a bool tensor (True = +1) or a real tensor whose sign is taken with ``sign(0) = +1``,
    e.g. the ``+-s`` weights of ``BinarizeConv2d.binary_weight()``. The shape is not stored in the
    result; keep ``tuple(w.shape)`` beside it for :func:`unpack_signs`.
    """
    bits = w if w.dtype == torch.bool else w >= 0
    return _pack_rows(bits.reshape(bits.shape[0], -1))


def unpack_signs(packed, shape, dtype=torch.float32):
    """Inverse of :func:`pack_signs`: a +-1 tensor of ``shape`` and ``dtype``."""
    shape = tuple(int(d) for d in shape)
    n = 1
    for d in shape[1:]:
        n *= d
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(packed.shape[0], -1)[:, :n]
    return (bits.to(dtype) * 2 - 1).reshape(shape)


def popcount_uint8(v):
    """Number of set bits of every byte of a uint8 tensor (SWAR bit counting, no lookup table)."""
    v = v - ((v >> 1) & 0x55)
    v = (v & 0x33) + ((v >> 2) & 0x33)
    return (v + (v >> 4)) & 0x0F


def xnor_popcount_conv2d(x, packed_w, shape, stride=1, padding=0, dilation=1, groups=1):
    """Integer output ``conv2d(sign(x), sign(w))`` of packed weights, by XNOR and popcount on bits.

    ``x`` (B, C, H, W) is any real tensor (only ``x >= 0`` is used, so +-1 inputs work too);
    ``packed_w``/``shape`` come from :func:`pack_signs`; ``padding`` is zero padding of the signed
    input (integers only). Returns int32 (B, out, H_out, W_out). A reference, not a fast kernel:
    one sample at a time, memory ``H_out * W_out * out * bytes_per_filter`` bytes.
    """
    out_ch, in_g, kh, kw = (int(d) for d in shape)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    batch, channels, height, width = x.shape
    if channels != in_g * groups or out_ch % groups:
        raise ValueError(f"input with {channels} channels does not fit weight {tuple(shape)} "
                         f"with groups={groups}")
    h_out = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    unfold = dict(kernel_size=(kh, kw), dilation=dilation, padding=padding, stride=stride)
    # Validity depends only on the spatial offset; repeat it over the channels of a group to get
    # the same (channel, kh, kw) order as the weight bits.
    ones = torch.ones(1, 1, height, width, device=x.device)
    valid = F.unfold(ones, **unfold)[0].bool().repeat(in_g, 1)           # (K, L)
    valid_bits = _pack_rows(valid.t())                                     # (L, nbytes)
    n_valid = popcount_uint8(valid_bits).sum(dim=-1, dtype=torch.int32)   # (L,)
    w_bits = packed_w.reshape(1, groups, out_ch // groups, -1)             # (1, G, O/G, nbytes)
    out = torch.empty(batch, out_ch, h_out * w_out, dtype=torch.int32, device=x.device)
    for b in range(batch):
        patches = F.unfold((x[b:b + 1] >= 0).float(), **unfold)[0]          # (G*K, L), 0/1
        a_bits = _pack_rows(patches.reshape(groups, -1, patches.shape[-1]).permute(2, 0, 1).bool())
        same = ~(a_bits.unsqueeze(2) ^ w_bits) & valid_bits[:, None, None, :]
        matches = popcount_uint8(same).sum(dim=-1, dtype=torch.int32)       # (L, G, O/G)
        dot = 2 * matches - n_valid[:, None, None]
        out[b] = dot.reshape(dot.shape[0], out_ch).t()
    return out.reshape(batch, out_ch, h_out, w_out)


def xnor_conv2d(x_sign, packed_w, shape, exponents, stride=1, padding=0, dilation=1, groups=1):
    """``conv2d(sign(x), sign(w) * 2**exponents)`` by XNOR-popcount; equals the training layer exactly.

    ``exponents`` holds one integer per output filter (the int8 of the packed format).
    """
    dot = xnor_popcount_conv2d(x_sign, packed_w, shape, stride, padding, dilation, groups)
    return torch.ldexp(dot.float(), exponents.to(torch.int32).view(1, -1, 1, 1))


class PackedBinaryConv2d(nn.Module):
    """Inference-only binary convolution from packed sign bits, a per-filter exponent and an affine.

    Output, per output channel ``o``, with ``dot`` the integer ``conv2d(sign(x), sign(w))``::

        y_o = dot_o * 2**e_o + bias_o                    (no batch norm folded in; bias may be absent)
        y_o = dot_o * (2**e_o * bn_scale_o) + bn_shift_o (a following eval batch norm folded in)

    ``bn_scale = gamma / sqrt(running_var + eps)`` and ``bn_shift = beta - running_mean * bn_scale``
    make the second form the eval batch norm of the first in real arithmetic (``2**e * bn_scale`` is
    formed exactly); in float32 it matches conv-then-BN up to a rounding or two.

    ``padding_mode`` other than ``"zeros"`` pads the input as ``nn.Conv2d`` does (those positions are
    real inputs, not masked). The default path unpacks the bits to +-1 and runs ``F.conv2d`` on
    ``sign(x)`` (``sign(0) = +1``);
    ``reference = True`` computes ``dot`` with :func:`xnor_popcount_conv2d` instead. Both give the
    same ``dot`` exactly. All state is in uint8/int8/float32 buffers (in ``state_dict``).
    """

    def __init__(self, bits, shape, exponent, stride=1, padding=0, dilation=1, groups=1, bias=None,
                 bn_scale=None, bn_shift=None, padding_mode="zeros"):
        super().__init__()
        if (bn_scale is None) != (bn_shift is None):
            raise ValueError("bn_scale and bn_shift come together")
        if bias is not None and bn_scale is not None:
            raise ValueError("a folded batch norm already contains the bias; pass bn_shift only")
        self.shape = tuple(int(d) for d in shape)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        self.folded_bn = bn_scale is not None
        self.reference = False
        self.register_buffer("bits", bits.to(torch.uint8))
        self.register_buffer("exponent", exponent.to(torch.int8))
        multiplier = torch.ones(self.shape[0]) if bn_scale is None else bn_scale.float()
        self.register_buffer("multiplier", torch.ldexp(multiplier, self.exponent.to(torch.int32)))
        shift = bias if bn_shift is None else bn_shift
        self.register_buffer("shift", None if shift is None else shift.float())

    def extra_repr(self):
        return (f"{self.shape[1] * self.groups}, {self.shape[0]}, kernel_size={self.shape[2:]}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, padding_mode={self.padding_mode}, folded_bn={self.folded_bn}, "
                f"reference={self.reference}")

    def integer_dot(self, x):
        """``conv2d(sign(x), sign(w))`` as a float tensor of exact integers."""
        padding = self.padding
        if self.padding_mode != "zeros":
            # As nn.Conv2d does: copies of real values have the signs of those values, so padding x
            # first equals padding sign(x), and the padded positions are real +-1 inputs.
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = (0, 0)
        if self.reference:
            return xnor_popcount_conv2d(x, self.bits, self.shape, self.stride, padding, self.dilation,
                                        self.groups).to(x.dtype)
        x_sign = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        weight = unpack_signs(self.bits, self.shape, x.dtype)
        return F.conv2d(x_sign, weight, None, self.stride, padding, self.dilation, self.groups)

    def forward(self, x):
        y = self.integer_dot(x) * self.multiplier.to(x.dtype).view(1, -1, 1, 1)
        if self.shift is not None:
            y = y + self.shift.to(x.dtype).view(1, -1, 1, 1)
        return y


def set_xnor_reference(model, reference=True):
    """Switch every :class:`PackedBinaryConv2d` in ``model`` to the XNOR-popcount path (or back)."""
    for m in model.modules():
        if isinstance(m, PackedBinaryConv2d):
            m.reference = bool(reference)
    return model
