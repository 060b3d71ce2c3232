"""Pieces shared by the model zoo: the conv factory, option-A shortcut, and the reference initialisations.

The latent weights' scale sets a binary network's training dynamics (SGD's relative step scales as
1 / sigma^2), so each network is initialised as its reference constructor does it; the functions
below say which constructor each one follows.
"""
import functools
import math

import torch.nn as nn
import torch.nn.functional as F

from modules import BinarizeConv2d


def conv_layer(binary):
    """The convolution class of a network: ``BinarizeConv2d`` (1-bit) or ``nn.Conv2d`` (full precision)."""
    return BinarizeConv2d if binary else nn.Conv2d


def conv3x3(conv, in_planes, out_planes, stride=1):
    """3x3 convolution with padding 1 and no bias, of class ``conv``."""
    return conv(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class OptionAShortcut(nn.Module):
    """Parameter-free downsampling shortcut (He et al. option A): stride-``s`` slice, zero-pad channels."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.stride = stride
        extra = out_planes - in_planes
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0) + self.pad)


def _batch_norms_one_zero(model):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_kaiming_fan_in(model, linear=False):
    """Kaiming-normal, fan-in, gain sqrt(2) (``init.kaiming_normal_`` defaults) for every convolution,
    and for the linear layers too when ``linear``; batch norms weight 1, bias 0; the rest PyTorch's.

    IR-Net's ResNet-20 (``_weights_init``: convolutions and linear layers) and the released LCR
    ``resnet_ir`` (convolutions only).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d) or (linear and isinstance(m, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    _batch_norms_one_zero(model)


def init_fan_out_normal(model, linear_std=None):
    """Every convolution ``N(0, 2 / (kh kw out))`` (fan-out, gain sqrt(2)), bias 0; batch norms 1, 0;
    linear layers ``N(0, linear_std^2)`` with bias 0 when ``linear_std`` is given, else PyTorch's.

    IR-Net's VGG-Small (linear_std 0.01), the released FP ResNets of LCR and torchvision's ResNets
    (``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` is the same normal).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
    _batch_norms_one_zero(model)


hardtanh = functools.partial(nn.Hardtanh, inplace=False)
