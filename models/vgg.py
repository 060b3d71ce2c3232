"""VGG-Small for CIFAR (IR-Net's ``vgg_small_1w1a``) and its full-precision twin.

FP conv 3->128 + BN + hardtanh, then convolutions 128-128(pool)-256-256(pool)-512-512(pool), each
followed by (pool,) BN, hardtanh; pooling comes before BN as in IR-Net. FP linear 8192 -> classes.
Five binary convolutions, about 4.66 M parameters. Initialised as IR-Net's ``VGG_SMALL_1W1A``:
fan-out normal convolutions, classifier ``N(0, 0.01^2)``.
"""
import torch.nn as nn

from models import recipes
from models.layers import conv3x3, conv_layer, hardtanh, init_fan_out_normal
from models.registry import register_model
from modules import LCRTap

_WIDTHS = (128, 128, 256, 256, 512, 512)
_POOL_AFTER = (1, 3, 5)


class VGGSmall(nn.Module):
    """VGG-Small: six 3x3 conv layers, the first full precision, max-pool after layers 1, 3 and 5."""

    def __init__(self, num_classes=10, binary=True):
        super().__init__()
        conv = conv_layer(binary)
        layers, in_ch = [], 3
        for i, width in enumerate(_WIDTHS):
            layers.append(conv3x3(nn.Conv2d if i == 0 else conv, in_ch, width))
            if i in _POOL_AFTER:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            layers += [nn.BatchNorm2d(width), hardtanh()]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.lcr_tap = LCRTap()
        self.fc = nn.Linear(_WIDTHS[-1] * 4 * 4, num_classes)
        init_fan_out_normal(self, linear_std=0.01)

    def forward(self, x):
        return self.fc(self.lcr_tap(self.features(x)).flatten(1))


@register_model("cifar", binary=True, fp_twin="vgg_small_fp", recipe=recipes.IRNET_VGG_SMALL)
def vgg_small_1w1a(num_classes=10):
    """Binary VGG-Small (1-bit weights and activations in conv layers 2-6)."""
    return VGGSmall(num_classes, binary=True)


@register_model("cifar", binary=False, fp_twin=None, recipe=recipes.IRNET_VGG_SMALL)
def vgg_small_fp(num_classes=10):
    """Full-precision twin of :func:`vgg_small_1w1a`."""
    return VGGSmall(num_classes, binary=False)
