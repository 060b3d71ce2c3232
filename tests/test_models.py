"""Tests of the model zoo (``models/``, docs/METHOD.md section 2): every registered model runs forward and
backward, has the documented size, number of binary layers and initialisation, IR-Net's CIFAR
ResNet-18 (written here from its released file) computes what ours does, and the FP ImageNet twins
are exactly torchvision's networks.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from conftest import randomise_batch_norms
from models import create_model, list_models, model_info
from modules.binary import BinarizeConv2d

IMAGENET_FP = {"resnet18_fp": torchvision.models.resnet18, "resnet34_fp": torchvision.models.resnet34}
EXPECTED = {
    # name: (parameters in millions per METHOD.md or None for torchvision-exact, binary convs)
    "resnet20_1w1a": (0.27, 18),
    "resnet20_fp": (0.27, 0),
    "resnet18_1w1a": (11.2, 16),
    "resnet18_cifar_fp": (11.2, 0),
    "vgg_small_1w1a": (4.6, 5),
    "vgg_small_fp": (4.6, 0),
    "resnet18_1w1a_IR": (11.7, 16),
    "resnet34_1w1a_IR": (21.8, 32),
    "resnet18_fp": (None, 0),
    "resnet34_fp": (None, 0),
}


def is_imagenet(name):
    return name.endswith("_IR") or name in IMAGENET_FP


def input_spec(name):
    """(num_classes, image size) a model is trained at."""
    return (1000, 224) if is_imagenet(name) else (10, 32)


_CACHE = {}


def built(name):
    """One instance per model for the read-only tests (parameter counts, layer types)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = create_model(name, num_classes=input_spec(name)[0])
    return _CACHE[name]


# ----------------------------------------------------------------------------- registry
def test_registry_lists_every_model_sorted():
    names = list_models()
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    for name in EXPECTED:
        assert name in names


def test_registry_has_no_untested_models():
    # a new registered model must get its expected size and binary-layer count here
    assert set(list_models()) <= set(EXPECTED)


def test_registry_metadata_is_the_documented_one():
    for name in EXPECTED:
        info = model_info(name)
        assert (info.num_classes, info.image_size) == input_spec(name), name
        assert info.binary == (EXPECTED[name][1] > 0), name
        twin = model_info(info.fp_twin)
        assert not twin.binary and twin.family == info.family, name
        # the twin has the binary network's body: the same parameter names in its stages
        def body(model):
            return {n for n, _ in model.named_parameters() if n.startswith(("layer", "features"))}
        assert body(built(name)) == body(built(info.fp_twin)), name
    assert model_info("vgg_small_1w1a").recipe["Tmin"] == 0.1 and model_info("vgg_small_1w1a").recipe["lr"] == 0.007


def test_unknown_model_raises_with_known_names():
    with pytest.raises(ValueError) as info:
        create_model("nope")
    message = str(info.value)
    assert "nope" in message
    for name in list_models():
        assert name in message


# ----------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name):
    num_classes, size = input_spec(name)
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes)
    model.train()
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([1, num_classes - 1])
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    loss = F.cross_entropy(out, y)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet20_1w1a", "vgg_small_1w1a", "resnet18_1w1a"])
def test_num_classes_is_honoured(name):
    model = create_model(name, num_classes=7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


# ----------------------------------------------------------------------------- sizes and layer types
@pytest.mark.parametrize("name", list_models())
def test_parameter_count(name):
    count = sum(p.numel() for p in built(name).parameters())
    millions, _ = EXPECTED[name]
    if millions is None:
        reference = IMAGENET_FP[name]()
        assert count == sum(p.numel() for p in reference.parameters())
    else:
        assert abs(count / 1e6 - millions) <= 0.02 * millions, count


def test_parameter_counts_closed_form():
    # ResNet-20 (option A, no shortcut parameters): convs + BNs + BatchNorm1d(64) + linear 64 -> 10
    convs = 3 * 16 * 9 + 6 * 16 * 16 * 9 + (16 * 32 + 5 * 32 * 32) * 9 + (32 * 64 + 5 * 64 * 64) * 9
    bns = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64) + 2 * 64
    assert sum(p.numel() for p in built("resnet20_1w1a").parameters()) == convs + bns + 64 * 10 + 10
    # VGG-Small: six 3x3 convs without bias, six BNs, linear 8192 -> 10
    widths = [3, 128, 128, 256, 256, 512, 512]
    convs = sum(a * b * 9 for a, b in zip(widths[:-1], widths[1:]))
    bns = 2 * sum(widths[1:])
    assert sum(p.numel() for p in built("vgg_small_1w1a").parameters()) == convs + bns + 8192 * 10 + 10
    # binary ImageNet ResNets: torchvision's count plus BatchNorm1d(512)
    for name, ref in (("resnet18_1w1a_IR", "resnet18_fp"), ("resnet34_1w1a_IR", "resnet34_fp")):
        assert (sum(p.numel() for p in built(name).parameters())
                == sum(p.numel() for p in built(ref).parameters()) + 2 * 512)


@pytest.mark.parametrize("name", list_models())
def test_binary_layer_count(name):
    model = built(name)
    n_binary = sum(isinstance(m, BinarizeConv2d) for m in model.modules())
    assert n_binary == EXPECTED[name][1]
    for m in model.modules():
        if isinstance(m, BinarizeConv2d):
            assert m.kernel_size == (3, 3)          # 1x1 downsampling shortcuts stay full precision


def _execution_order(model, size):
    """Convolutions and linear layers in the order a forward pass calls them."""
    order, handles = [], []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(lambda mod, i, o: order.append(mod)))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return order


@pytest.mark.parametrize("name", [n for n in EXPECTED if EXPECTED[n][1] > 0])
def test_stem_and_classifier_are_full_precision(name):
    size = 64 if is_imagenet(name) else 32
    order = _execution_order(built(name), size)
    stem, classifier = order[0], order[-1]
    assert type(stem) is nn.Conv2d and stem.in_channels == 3
    assert type(classifier) is nn.Linear
    assert classifier.out_features == input_spec(name)[0]
    # the first binary conv comes right after the stem
    assert isinstance(order[1], BinarizeConv2d)


# ----------------------------------------------------------------------------- torchvision twins
@pytest.mark.parametrize("name", sorted(IMAGENET_FP))
def test_fp_twin_loads_torchvision_weights_and_matches(name):
    torch.manual_seed(1)
    reference = IMAGENET_FP[name]()
    # give BatchNorm non-trivial statistics so that eval outputs exercise every parameter and buffer
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    model = create_model(name)
    model.load_state_dict(reference.state_dict(), strict=True)
    assert set(model.state_dict()) == set(reference.state_dict())
    model.eval()
    reference.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out, expected = model(x), reference(x)
    assert out.shape == (2, 1000)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- initialisation
def _fan_in(w):
    return w[0].numel()


def _fan_out(w):
    return w.shape[0] * (w[0, 0].numel() if w.dim() == 4 else 1)


# The reference constructors' weight std per layer type, as their released files initialise:
# IR-Net CIFAR-10/ResNet20 `_weights_init`: init.kaiming_normal (fan-in, gain sqrt 2) on Conv2d and
# Linear. IR-Net VGG-Small `_initialize_weights`: convs N(0, 2 / (kh kw out)), Linear N(0, 0.01^2).
# IR-Net CIFAR-10/ResNet18: no init, PyTorch's kaiming_uniform(a=sqrt 5), std 1 / sqrt(3 fan_in).
# Released LCR resnet_ir: kaiming_normal_ on Conv2d only. torchvision ResNets: kaiming_normal_
# (fan-out, relu) on Conv2d, Linear left at PyTorch's default.
def _kaiming_fan_in(w):
    return math.sqrt(2.0 / _fan_in(w))


def _pytorch_default(w):
    return 1.0 / math.sqrt(3.0 * _fan_in(w))


def _fan_out_normal(w):
    return math.sqrt(2.0 / _fan_out(w))


REFERENCE_STD = {  # name: (conv rule, linear rule)
    "resnet20_1w1a": (_kaiming_fan_in, _kaiming_fan_in),
    "resnet20_fp": (_kaiming_fan_in, _kaiming_fan_in),
    "vgg_small_1w1a": (_fan_out_normal, lambda w: 0.01),
    "vgg_small_fp": (_fan_out_normal, lambda w: 0.01),
    "resnet18_1w1a": (_pytorch_default, _pytorch_default),
    "resnet18_cifar_fp": (_pytorch_default, _pytorch_default),
    "resnet18_1w1a_IR": (_kaiming_fan_in, _pytorch_default),
    "resnet34_1w1a_IR": (_kaiming_fan_in, _pytorch_default),
    "resnet18_fp": (_fan_out_normal, _pytorch_default),
    "resnet34_fp": (_fan_out_normal, _pytorch_default),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_STD))
def test_initialisation_matches_the_reference_constructor(name):
    conv_rule, linear_rule = REFERENCE_STD[name]
    checked = 0
    for module_name, m in built(name).named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            rule = conv_rule if isinstance(m, nn.Conv2d) else linear_rule
            expected, got = rule(m.weight), float(m.weight.detach().std())
            assert abs(got / expected - 1) <= 0.10, f"{module_name}: std {got:.4g}, reference {expected:.4g}"
            checked += 1
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any(), module_name
    assert checked >= 6


# ----------------------------------------------------------------------------- IR-Net's CIFAR ResNet-18
class _IRNetBlock(nn.Module):
    """htqin/IR-Net CIFAR-10/ResNet18/resnet.py BasicBlock, as released (IRConv2d = BinarizeConv2d)."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = BinarizeConv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = BinarizeConv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.hardtanh(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.hardtanh(out)


class _IRNetResNet18(nn.Module):
    """The released CIFAR ResNet-18: stem bn1(conv1(x)) with no activation, avg_pool2d(4), bn2, linear,
    LogSoftmax."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes, stages = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_IRNetBlock(in_planes, planes, stride), _IRNetBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512, num_classes)
        self.bn2 = nn.BatchNorm1d(512)

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4).flatten(1)
        return F.log_softmax(self.linear(self.bn2(out)), dim=1)


def test_cifar_resnet18_computes_what_irnet_releases():
    torch.manual_seed(3)
    reference = _IRNetResNet18()
    randomise_batch_norms(reference)
    ours = create_model("resnet18_1w1a")
    renamed = {k.replace("shortcut", "downsample").replace("linear", "fc"): v
               for k, v in reference.state_dict().items()}
    ours.load_state_dict(renamed, strict=True)
    ours.eval()
    reference.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(F.log_softmax(ours(x), dim=1), reference(x), rtol=1e-5, atol=1e-5)
