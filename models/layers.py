"""Pieces shared by the model zoo: the conv factory, option-A shortcut, weight init."""
import functools

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


def init_weights(model, nonlinearity="leaky_relu"):
    """Kaiming-normal convolutions (fan-in), BatchNorm weight 1 and bias 0; linear layers keep torch's init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity=nonlinearity)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


hardtanh = functools.partial(nn.Hardtanh, inplace=False)
