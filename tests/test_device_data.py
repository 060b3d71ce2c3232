"""``--gpu_data``: on-device CIFAR batches reproduce torchvision's crop/flip/normalise pipeline."""
import collections

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import COMMON_FLAGS, assert_ok, read_summary, run_main, write_cifar10
from utils.data import build_datasets, dataset_info
from utils.device_data import DeviceLoader, crop_flip


def _reference(image_hwc, oy, ox, flip, padding=4):
    """torchvision on a PIL image: pad with black, crop at (oy, ox), optional mirror, back to uint8."""
    img = TF.pad(Image.fromarray(image_hwc), padding, fill=0)
    img = TF.crop(img, oy, ox, image_hwc.shape[0], image_hwc.shape[1])
    if flip:
        img = TF.hflip(img)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def test_crop_flip_equals_torchvision_per_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    oy = torch.tensor([0, 8, 4, 3, 0, 8, 1, 7, 2, 5, 6, 8])
    ox = torch.tensor([0, 8, 2, 6, 8, 0, 5, 1, 4, 3, 7, 8])
    flip = torch.tensor([False, True, True, False, True, False, True, True, False, False, True, False])
    ours = crop_flip(torch.from_numpy(images).permute(0, 3, 1, 2), oy, ox, flip, 4)
    for i in range(len(images)):
        expected = _reference(images[i], int(oy[i]), int(ox[i]), bool(flip[i]))
        assert torch.equal(ours[i], expected), i


def test_validation_batches_equal_the_dataset_transform(tmp_path):
    write_cifar10(tmp_path, n_per_batch=4, n_test=10)
    train_set, val_set, _ = build_datasets("cifar10", tmp_path)
    info = dataset_info("cifar10")
    loader = DeviceLoader(val_set.images, val_set.labels, 4, info["mean"], info["std"], "cpu", train=False)
    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    expected = torch.stack([val_set[i][0] for i in range(len(val_set))])
    assert torch.allclose(images, expected, atol=1e-5)
    assert labels.tolist() == [int(v) for v in val_set.labels]


def test_training_epoch_visits_every_image_once_with_random_crops(tmp_path):
    write_cifar10(tmp_path, n_per_batch=8, n_test=2)
    train_set, _, _ = build_datasets("cifar10", tmp_path)
    info = dataset_info("cifar10")
    gen = torch.Generator().manual_seed(0)
    loader = DeviceLoader(train_set.images, train_set.labels, 6, info["mean"], info["std"], "cpu",
                          train=True, generator=gen)
    assert len(loader) == 7
    labels = torch.cat([y for _, y in loader]).tolist()
    assert collections.Counter(labels) == collections.Counter(int(v) for v in train_set.labels)
    # every augmented image is a padded crop (possibly mirrored) of some training image
    mean = torch.tensor(info["mean"]).view(3, 1, 1) * 255
    std = torch.tensor(info["std"]).view(3, 1, 1) * 255
    gen.manual_seed(1)
    batch, _ = next(iter(loader))
    pixels = torch.round(batch * std + mean).to(torch.uint8)
    candidates = {(int(a), int(b), bool(f)) for a in range(9) for b in range(9) for f in (0, 1)}
    source = torch.from_numpy(train_set.images).permute(0, 3, 1, 2)
    for img in pixels:
        assert any(torch.equal(crop_flip(source[j:j + 1], torch.tensor([a]), torch.tensor([b]),
                                         torch.tensor([f]), 4)[0], img)
                   for j in range(len(source)) for a, b, f in candidates)
    # a reseeded generator repeats the epoch exactly; another seed does not
    gen.manual_seed(5)
    first = torch.cat([x for x, _ in loader])
    gen.manual_seed(5)
    assert torch.equal(first, torch.cat([x for x, _ in loader]))
    gen.manual_seed(6)
    assert not torch.equal(first, torch.cat([x for x, _ in loader]))


def test_sharding_covers_the_set_once():
    images = np.zeros((11, 32, 32, 3), dtype=np.uint8)
    labels = list(range(11))
    seen = []
    for rank in range(3):
        loader = DeviceLoader(images, labels, 2, (0, 0, 0), (1, 1, 1), "cpu", train=False, rank=rank, world_size=3)
        seen += torch.cat([y for _, y in loader]).tolist()
    assert sorted(seen) == labels


@pytest.mark.slow(reason="two training runs of the CIFAR script: about 12 s; the --gpu_data loader itself is "
                        "checked in the default set (every image once per epoch, random crops)")
def test_cifar_script_with_gpu_data(tmp_path):
    write_cifar10(tmp_path / "data", n_per_batch=20, n_test=30)
    result = run_main("cifar/main.py", "--dataset", "cifar10", "--data_path", tmp_path / "data", "--gpu_data",
                      "--epochs", "1", "-b", "25", "--results_dir", tmp_path, *COMMON_FLAGS)
    assert_ok(result)
    (row,) = read_summary(tmp_path / "resnet20_1w1a" / "summary.csv")
    assert row["val_top1"] is not None

    result = run_main("cifar/main.py", "--dataset", "digits", "--gpu_data", "--epochs", "1",
                      "--results_dir", tmp_path, "--save", "_digits", *COMMON_FLAGS)
    assert result.returncode == 1 and "--gpu_data works with cifar10/cifar100" in result.stderr
