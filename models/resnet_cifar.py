"""CIFAR ResNet-20 with Bi-Real blocks and option-A shortcuts (IR-Net's ``resnet20_1w1a``) and its FP twin.

Stem: FP 3x3 conv 3->16, BN, hardtanh. Three stages of three blocks (16, 32, 64 channels); each
block has a shortcut around every 3x3 convolution, ``out = hardtanh(bn(conv(x)) + shortcut(x))``.
Head: global average pool, BatchNorm1d(64), FP linear. 18 binary convolutions, about 0.27 M
parameters. Initialised as IR-Net's ``_weights_init``: Kaiming normal for convolutions and the
classifier.
"""
import torch.nn as nn

from models import recipes
from models.layers import OptionAShortcut, conv3x3, conv_layer, hardtanh, init_kaiming_fan_in
from models.registry import register_model
from modules import LCRTap


class BiRealBlockA(nn.Module):
    """Two 3x3 convolutions, each wrapped by its own shortcut; the first may downsample (option A)."""

    def __init__(self, conv, in_planes, planes, stride):
        super().__init__()
        self.conv1 = conv3x3(conv, in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(conv, planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = (OptionAShortcut(in_planes, planes, stride)
                         if stride != 1 or in_planes != planes else nn.Identity())
        self.act = hardtanh()

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)) + self.shortcut(x))
        return self.act(self.bn2(self.conv2(out)) + out)


class ResNetCifar(nn.Module):
    """ResNet-6n+2 for 32x32 inputs with :class:`BiRealBlockA` blocks."""

    def __init__(self, depth=20, num_classes=10, binary=True, widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        conv = conv_layer(binary)
        self.conv1 = conv3x3(nn.Conv2d, 3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act = hardtanh()
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths):
            layers = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BiRealBlockA(conv, in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.lcr_tap = LCRTap()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.bn2 = nn.BatchNorm1d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        init_kaiming_fan_in(self, linear=True)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.lcr_tap(x)
        x = self.bn2(self.avgpool(x).flatten(1))
        return self.fc(x)


@register_model("cifar", binary=True, fp_twin="resnet20_fp", recipe=recipes.IRNET_RESNET20)
def resnet20_1w1a(num_classes=10):
    """Binary ResNet-20 (1-bit weights and activations), Bi-Real blocks, option-A shortcuts."""
    return ResNetCifar(20, num_classes, binary=True)


@register_model("cifar", binary=False, fp_twin=None, recipe=recipes.IRNET_RESNET20)
def resnet20_fp(num_classes=10):
    """Full-precision twin of :func:`resnet20_1w1a`."""
    return ResNetCifar(20, num_classes, binary=False)
