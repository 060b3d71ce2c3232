"""Tests of the model zoo (``models/``, METHOD.md section 2): every registered model runs forward and
backward, has the documented size and number of binary layers, and the FP ImageNet twins are exactly
torchvision's networks.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from models import create_model, list_models
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
