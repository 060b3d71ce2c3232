"""utils/corruptions.py: digits-C is deterministic, in range, clean at severity 0, normalised like
the clean test split, and harder at every higher severity."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision import transforms

from conftest import COMMON_FLAGS, REPO_ROOT, assert_ok, run_main
from utils import corruptions as C
from utils.data import DIGITS_MEAN, DIGITS_STD, DigitsDataset

SUBSET = 64  # images for the checks that do not need the whole test split


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clean():
    return C.digits_test_images()


@pytest.fixture(scope="module")
def sweep(clean):
    """Every family and severity of the whole test split, grey and un-normalised (about 3 s)."""
    images = clean[0]
    return {(family, severity): C.corrupt(images, family, severity)
            for family in C.FAMILIES for severity in C.SEVERITIES}


def test_at_least_ten_families_each_with_five_parameters():
    assert len(C.FAMILIES) >= 10 and len(set(C.FAMILIES)) == len(C.FAMILIES)
    assert C.SEVERITIES == (1, 2, 3, 4, 5)
    for family in C.FAMILIES:
        params = [C.parameter(family, severity) for severity in C.SEVERITIES]
        assert len(set(params)) == len(params), family


def test_clean_images_are_the_test_split(clean):
    images, labels = clean
    dataset = DigitsDataset(train=False)
    assert images.dtype == torch.float32 and images.shape == (len(dataset), 32, 32)
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(labels, dataset.labels)
    # Normalised the way utils.data does it, they are the clean split bit for bit.
    assert torch.equal((images.unsqueeze(1) - DIGITS_MEAN[0]) / DIGITS_STD[0], dataset.images)


@pytest.mark.parametrize("family", C.FAMILIES)
def test_severity_zero_is_clean(clean, family):
    images, labels = clean
    assert torch.equal(C.corrupt(images, family, 0), images)
    batch, batch_labels = C.digits_c(family, 0)
    dataset = DigitsDataset(train=False)
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert torch.equal(batch, expected)
    assert torch.equal(batch_labels, labels)


def test_every_family_and_severity_is_deterministic(clean, sweep):
    """A second pass over the whole split (through digits_c) gives the same bits; so do two calls
    on a numpy batch."""
    subset = clean[0][:SUBSET].numpy()
    for (family, severity), first in sweep.items():
        again, _ = C.digits_c(family, severity)
        assert torch.equal(again, C.normalise(first)), (family, severity)
        assert np.array_equal(C.corrupt(subset, family, severity), C.corrupt(subset, family, severity)), \
            (family, severity)


def test_outputs_in_range_with_shape_and_type(clean, sweep):
    images = clean[0]
    for key, out in sweep.items():
        assert out.dtype == torch.float32 and out.shape == images.shape, key
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1, key
    array = C.corrupt(images[:SUBSET].numpy(), C.FAMILIES[0], 3)
    assert isinstance(array, np.ndarray) and array.dtype == np.float32 and array.shape == (SUBSET, 32, 32)


def _rms_to_clean(sweep, images, family):
    return [float((sweep[family, severity] - images).double().pow(2).mean().sqrt()) for severity in C.SEVERITIES]


def test_distance_to_clean_grows_with_severity(clean, sweep):
    for family in C.FAMILIES:
        rms = _rms_to_clean(sweep, clean[0], family)
        assert rms[0] > 0, family
        assert all(a < b for a, b in zip(rms, rms[1:])), f"{family}: RMS distance to clean {rms}"


def test_normalisation_matches_the_clean_path(sweep):
    """digits_c normalises like torchvision's Normalize with the digits constants, grey to 3 channels."""
    normalise = transforms.Normalize(DIGITS_MEAN, DIGITS_STD)
    for family in C.FAMILIES:
        batch, _ = C.digits_c(family, 3)
        grey = sweep[family, 3]
        assert batch.shape == (grey.shape[0], 3, 32, 32)
        assert torch.equal(batch, normalise(grey.unsqueeze(1).repeat(1, 3, 1, 1))), family


def test_bad_arguments_raise(clean):
    images = clean[0][:2]
    with pytest.raises(ValueError, match="unknown corruption"):
        C.corrupt(images, "snow", 1)
    for severity in (-1, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity"):
            C.corrupt(images, "contrast", severity)
    with pytest.raises(ValueError, match="N x H x W"):
        C.corrupt(images.unsqueeze(1), "contrast", 1)


# --- severity ordering for trained models ----------------------------------------------------------

TINY_WIDTH = 8  # channels of the first convolution
TINY_EPOCHS = 3
TINY_BATCH = 64
TINY_LR = 0.003  # Adam


def _tiny_net():
    """Two conv-BN-ReLU-pool stages and a linear layer: 97 % clean digits after about a second."""
    width = TINY_WIDTH
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 8 * 8, 10),
    )


def _accuracy(model, images, labels):
    with torch.no_grad():
        return 100.0 * (model(images).argmax(dim=1) == labels).float().mean().item()


def _accuracy_table(model, corrupted):
    """Clean accuracy and {family: accuracies at severities 1..5}; ``corrupted(family, severity)``
    gives the model input."""
    model.eval()
    labels = C.digits_test_images()[1]
    clean = _accuracy(model, corrupted(C.FAMILIES[0], 0), labels)
    return clean, {family: [_accuracy(model, corrupted(family, severity), labels) for severity in C.SEVERITIES]
                   for family in C.FAMILIES}


def test_tiny_model_loses_accuracy_with_severity(clean, sweep):
    """A small full-precision CNN trained for about a second: averaged over families, accuracy
    falls at every severity step and ends far below clean."""
    torch.manual_seed(0)
    train = DigitsDataset(train=True)
    images, labels = train.images.repeat(1, 3, 1, 1), train.labels
    model = _tiny_net()
    optimiser = torch.optim.Adam(model.parameters(), lr=TINY_LR)
    for _ in range(TINY_EPOCHS):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), TINY_BATCH):
            batch = order[start:start + TINY_BATCH]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimiser.step()

    def corrupted(family, severity):
        return C.normalise(clean[0] if severity == 0 else sweep[family, severity])

    clean_accuracy, table = _accuracy_table(model, corrupted)
    assert clean_accuracy > 90
    means = [clean_accuracy] + [float(np.mean([table[f][s - 1] for f in C.FAMILIES])) for s in C.SEVERITIES]
    assert all(a > b for a, b in zip(means, means[1:])), f"mean accuracy clean, 1..5: {means}"
    assert means[-1] < clean_accuracy - 20, f"mean accuracy clean, 1..5: {means}"


BASELINE_EPOCHS = 30
ORDER_TOLERANCE = 1.5  # accuracy points one severity may beat the one before: a few of 450 images
SEVERITY1_MAX_DROP = 7.0  # accuracy points below clean
SEVERITY5_MIN_DROP = 10.0
# JPEG barely hurts smooth 32 x 32 digits: about 5 points at severity 5 in the calibration.
SEVERITY5_MIN_DROP_JPEG = 2.0
BASELINE_TIMEOUT_S = 900


@pytest.mark.slow(reason="trains the IR-Net baseline (binary ResNet-20, 30 epochs): "
                        "3-4 minutes on an idle core, about 7 on a busy one")
def test_irnet_baseline_loses_accuracy_smoothly(tmp_path):
    """The calibration target: for the baseline the parameters were chosen on, every family's
    accuracy falls (within a few images) from severity 1 to 5, mildly at 1 and clearly by 5."""
    import models  # here, so that the fast tests need only utils

    flags = ("--dataset", "digits", "--epochs", str(BASELINE_EPOCHS), "-b", "64", "--alpha", "0",
             "--lip_images", "0", "--results_dir", tmp_path, *COMMON_FLAGS, "-p", "100")
    assert_ok(run_main("main.py", *flags, cwd=REPO_ROOT / "cifar", timeout=BASELINE_TIMEOUT_S))
    model = models.create_model("resnet20_1w1a", num_classes=10)
    checkpoint = torch.load(tmp_path / "resnet20_1w1a" / "model_best.pth.tar", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    clean, table = _accuracy_table(model, lambda family, severity: C.digits_c(family, severity)[0])
    for family, accuracy in table.items():
        curve = [clean] + accuracy
        min_drop = SEVERITY5_MIN_DROP_JPEG if family == "jpeg_compression" else SEVERITY5_MIN_DROP
        assert clean - accuracy[0] <= SEVERITY1_MAX_DROP, f"{family}: {curve}"
        assert clean - accuracy[-1] >= min_drop, f"{family}: {curve}"
        assert all(b <= a + ORDER_TOLERANCE for a, b in zip(accuracy, accuracy[1:])), f"{family}: {curve}"
