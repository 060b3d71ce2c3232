"""Tests of ``tools/summary.py``: BOPs, FLOPs, OPs and memory against a hand count from the architecture.

The expected multiply-accumulates are derived here from the network descriptions of METHOD.md
section 2 (ImageNet ResNets: 7x7/2 stem to 112x112, max-pool to 56x56, stages at 56/28/14/7 with
64/128/256/512 channels, the first 3x3 conv of stages 2-4 strided, FP 1x1 stride-2 downsampling,
fc 512 -> 1000), not from the tool's layer list. Published totals: Bi-Real Net Table 4, 1.63e8 OPs
(ResNet-18) and 1.93e8 (ResNet-34), 33.6 / 43.7 Mbit. They carry three significant digits (0.3 %
rounding) and do not say whether the 5.1e5 MACs of the classifier are in them (another 0.3 %), so
the tolerance is 1 %.
"""
import pytest

from models import list_models
from tools.summary import BOPS_PER_OP, PUBLISHED_OPS, cost_summary, main as summary_main, readme_rows

PUBLISHED_MBIT = {"resnet18_1w1a_IR": 33.6, "resnet34_1w1a_IR": 43.7}
REL_TOL = 0.01


def imagenet_resnet_hand_count(blocks):
    """(BOPs, FLOPs, binary weights, FP parameters) of a Bi-Real ImageNet ResNet, ``blocks`` per stage.

    FP parameters: stem, 1x1 downsampling convs, fc (+ bias) and the weight and bias of every batch
    norm (stem, one per binary conv, one per downsampling conv, BatchNorm1d(512) before the fc).
    """
    widths, sides = (64, 128, 256, 512), (56, 28, 14, 7)
    bops = binary_w = 0
    flops = 112 * 112 * 64 * (3 * 7 * 7) + 512 * 1000  # stem, fc
    fp_params = 64 * 3 * 7 * 7 + 512 * 1000 + 1000
    bn_channels = 64 + 512
    for s, (width, side, n) in enumerate(zip(widths, sides, blocks)):
        for conv in range(2 * n):
            cin = widths[s - 1] if (s > 0 and conv == 0) else width
            bops += side * side * width * cin * 9
            binary_w += width * cin * 9
            bn_channels += width
        if s > 0:
            flops += side * side * width * widths[s - 1]
            fp_params += width * widths[s - 1]
            bn_channels += width
    return bops, flops, binary_w, fp_params + 2 * bn_channels


@pytest.mark.parametrize("name, blocks", [("resnet18_1w1a_IR", (2, 2, 2, 2)), ("resnet34_1w1a_IR", (3, 4, 6, 3))])
def test_imagenet_resnets_against_hand_count_and_bi_real(name, blocks):
    s = cost_summary(name)
    bops, flops, binary_w, fp_params = imagenet_resnet_hand_count(blocks)
    assert (s["bops"], s["flops"]) == (bops, flops)
    assert s["ops"] == bops / BOPS_PER_OP + flops
    assert abs(s["ops"] / PUBLISHED_OPS[name] - 1) < REL_TOL
    assert s["params"] == binary_w + fp_params
    assert s["memory_bytes"] * 8 == binary_w + 32 * fp_params
    assert abs(s["memory_bytes"] * 8 / 1e6 / PUBLISHED_MBIT[name] - 1) < REL_TOL


def test_resnet18_numbers_are_the_documented_ones():
    s = cost_summary("resnet18_1w1a_IR")
    assert s["bops"] == 1_676_279_808 and s["flops"] == 137_793_536
    assert round(s["ops"] / 1e5) == 1640


def test_cifar_models_against_hand_count():
    r20 = cost_summary("resnet20_1w1a")
    bops = (6 * 32 * 32 * 16 * 16 * 9
            + 16 * 16 * 32 * 16 * 9 + 5 * 16 * 16 * 32 * 32 * 9
            + 8 * 8 * 64 * 32 * 9 + 5 * 8 * 8 * 64 * 64 * 9)
    assert (r20["bops"], r20["flops"]) == (bops, 32 * 32 * 16 * 27 + 64 * 10)
    vgg = cost_summary("vgg_small_1w1a")
    bops = (32 * 32 * 128 * 128 * 9 + 16 * 16 * 256 * 128 * 9 + 16 * 16 * 256 * 256 * 9
            + 8 * 8 * 512 * 256 * 9 + 8 * 8 * 512 * 512 * 9)
    assert (vgg["bops"], vgg["flops"]) == (bops, 32 * 32 * 128 * 27 + 8192 * 10)


def test_layer_rows_bit_widths_and_arguments():
    s = cost_summary("resnet20_1w1a", num_classes=100, image_size=64)
    assert s["num_classes"] == 100 and s["image_size"] == 64
    for r in s["layers"]:
        if r["type"] == "BinarizeConv2d":
            assert (r["weight_bits"], r["act_bits"], r["flops"]) == (1, 1, 0)
            assert r["memory_bytes"] * 8 == r["params"]
        else:
            assert r["weight_bits"] == 32 and r["bops"] == 0
    assert s["bops"] == 4 * cost_summary("resnet20_1w1a")["bops"]


@pytest.mark.parametrize("name", list_models())
def test_every_model_summarises(name):
    s = cost_summary(name)
    assert s["flops"] > 0
    assert (s["bops"] > 0) == ("1w1a" in name)


def test_readme_row_and_cli(capsys):
    table = readme_rows(["resnet20_1w1a"]).splitlines()
    assert len(table) == 3 and table[2].startswith("| `resnet20_1w1a` | 10, 32 px |")
    assert summary_main(["resnet18_1w1a_IR"]) == 0
    out = capsys.readouterr().out
    assert "1.676e9" in out and "1.378e8" in out and "1.640e8" in out and "+0.60 %" in out
