"""ResNet-18/34 with torchvision's parameter names: binary IR-Net/Bi-Real variants and FP twins.

One :class:`ResNet` class serves every 4-stage ResNet in the zoo:

- ``resnet18_1w1a_IR`` / ``resnet34_1w1a_IR`` (ImageNet): FP 7x7/2 stem + BN + hardtanh + max-pool,
  Bi-Real blocks (a shortcut around every binary 3x3 conv, hardtanh after each add), FP 1x1
  stride-2 conv + BN downsampling, average pool, BatchNorm1d(512), FP fc.
- ``resnet18_1w1a`` (CIFAR, IR-Net's ``CIFAR-10/ResNet18/resnet.py``): 3x3 stride-1 stem conv + BN
  with no activation before ``layer1``, standard basic blocks (shortcut around each pair of binary
  convs) with hardtanh, FP 1x1 conv + BN downsampling, BatchNorm1d before the FP linear.
- ``resnet18_fp`` / ``resnet34_fp``: exactly torchvision's ``resnet18()`` / ``resnet34()`` (ReLU,
  standard blocks, no head BN), so torchvision ImageNet state dicts load with ``strict=True``.
- ``resnet18_cifar_fp``: full-precision twin of ``resnet18_1w1a``.

Initialisation follows each reference: the released LCR ``resnet_ir`` (Kaiming normal, fan-in, for
convolutions) for the binary ImageNet ResNets, torchvision's (fan-out normal) for the FP ImageNet
ResNets, and PyTorch's defaults (IR-Net's CIFAR ResNet-18 initialises nothing) for the CIFAR ones.
"""
import torch.nn as nn

from models import recipes
from models.layers import conv3x3, conv_layer, hardtanh, init_fan_out_normal, init_kaiming_fan_in
from models.registry import register_model
from modules import LCRTap


class BasicBlock(nn.Module):
    """Basic block with torchvision's names (conv1, bn1, conv2, bn2, downsample).

    ``bireal=True``: ``out = act(bn1(conv1(x)) + down(x)); out = act(bn2(conv2(out)) + out)``.
    ``bireal=False``: ``out = act(bn2(conv2(act(bn1(conv1(x))))) + down(x))``.
    """

    def __init__(self, conv, inplanes, planes, stride, downsample, bireal, act):
        super().__init__()
        self.conv1 = conv3x3(conv, inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(conv, planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.bireal = bireal
        self.act = act()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        if self.bireal:
            out = self.act(self.bn1(self.conv1(x)) + identity)
            return self.act(self.bn2(self.conv2(out)) + out)
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """4-stage ResNet of :class:`BasicBlock` (see the module docstring for the variants)."""

    def __init__(self, layers, num_classes=1000, binary=True, bireal=True, act=hardtanh,
                 imagenet_stem=True, head_bn=True, init=None, widths=(64, 128, 256, 512)):
        super().__init__()
        conv = conv_layer(binary)
        if imagenet_stem:
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(nn.Conv2d, 3, widths[0])
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        # the ImageNet stems end in an activation; IR-Net's CIFAR ResNet-18 stem is bn1(conv1(x)) alone
        self.stem_act = act() if imagenet_stem else nn.Identity()
        inplanes = widths[0]
        for i, (planes, blocks) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            blocks_i = []
            for j in range(blocks):
                down = None
                if j == 0 and (stride != 1 or inplanes != planes):
                    down = nn.Sequential(nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                         nn.BatchNorm2d(planes))
                blocks_i.append(BasicBlock(conv, inplanes, planes, stride if j == 0 else 1, down, bireal, act))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks_i))
        self.lcr_tap = LCRTap()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.bn2 = nn.BatchNorm1d(widths[-1]) if head_bn else nn.Identity()
        self.fc = nn.Linear(widths[-1], num_classes)
        if init is not None:
            init(self)

    def forward(self, x):
        x = self.maxpool(self.stem_act(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.lcr_tap(x)
        return self.fc(self.bn2(self.avgpool(x).flatten(1)))


@register_model("imagenet", binary=True, fp_twin="resnet18_fp", recipe=recipes.LCR_IMAGENET)
def resnet18_1w1a_IR(num_classes=1000):
    """Binary ImageNet ResNet-18 with Bi-Real blocks (IR-Net, the released LCR ``resnet_ir``)."""
    return ResNet((2, 2, 2, 2), num_classes, init=init_kaiming_fan_in)


@register_model("imagenet", binary=True, fp_twin="resnet34_fp", recipe=recipes.LCR_IMAGENET)
def resnet34_1w1a_IR(num_classes=1000):
    """Binary ImageNet ResNet-34 with Bi-Real blocks (IR-Net, the released LCR ``resnet_ir``)."""
    return ResNet((3, 4, 6, 3), num_classes, init=init_kaiming_fan_in)


@register_model("imagenet", binary=False, fp_twin=None, recipe=recipes.LCR_IMAGENET)
def resnet18_fp(num_classes=1000):
    """Full-precision ImageNet ResNet-18, torchvision's ``resnet18()`` architecture, names and init."""
    return ResNet((2, 2, 2, 2), num_classes, binary=False, bireal=False, act=nn.ReLU, head_bn=False,
                  init=init_fan_out_normal)


@register_model("imagenet", binary=False, fp_twin=None, recipe=recipes.LCR_IMAGENET)
def resnet34_fp(num_classes=1000):
    """Full-precision ImageNet ResNet-34, torchvision's ``resnet34()`` architecture, names and init."""
    return ResNet((3, 4, 6, 3), num_classes, binary=False, bireal=False, act=nn.ReLU, head_bn=False,
                  init=init_fan_out_normal)


@register_model("cifar", binary=True, fp_twin="resnet18_cifar_fp", recipe=recipes.IRNET_CIFAR_RESNET18)
def resnet18_1w1a(num_classes=10):
    """Binary CIFAR ResNet-18 (IR-Net): 3x3 stem, standard blocks, hardtanh, FP downsampling."""
    return ResNet((2, 2, 2, 2), num_classes, bireal=False, imagenet_stem=False)


@register_model("cifar", binary=False, fp_twin=None, recipe=recipes.IRNET_CIFAR_RESNET18)
def resnet18_cifar_fp(num_classes=10):
    """Full-precision twin of :func:`resnet18_1w1a`."""
    return ResNet((2, 2, 2, 2), num_classes, binary=False, bireal=False, imagenet_stem=False)
