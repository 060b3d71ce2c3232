"""Tests for utils/data.py: on-disk formats written in tmp_path, never downloaded.

CIFAR pickles and ImageNet JPEG folders are written in the real formats (by the
writers in conftest.py), so the readers are exercised end to end; network access
is blocked wherever a download is attempted.
"""

import socket

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import dump_pickle, write_cifar10, write_cifar100, write_image_folder
from utils.data import DATASETS, DataError, build_datasets, dataset_info

CIFAR_SIDE_PX = 32
CIFAR_PLANE_BYTES = CIFAR_SIDE_PX * CIFAR_SIDE_PX
CIFAR_PAD_PX = 4
DIGITS_PAD_PX = 2
DIGITS_TOTAL_IMAGES = 1797
DIGITS_TEST_FRACTION = 0.25


def _unnormalise(image, name):
    info = dataset_info(name)
    mean = torch.tensor(info["mean"]).view(-1, 1, 1)
    std = torch.tensor(info["std"]).view(-1, 1, 1)
    return image * std + mean


def _crops(padded, side_px, pad_px, with_flips):
    """Every crop (and mirrored crop) that a random crop of `padded` could give."""
    for top in range(2 * pad_px + 1):
        for left in range(2 * pad_px + 1):
            crop = padded[:, top:top + side_px, left:left + side_px]
            yield (top, left, False), crop
            if with_flips:
                yield (top, left, True), crop.flip(-1)


def _matching_crop(image, padded, side_px, pad_px, with_flips, atol):
    for placement, crop in _crops(padded, side_px, pad_px, with_flips):
        if torch.allclose(image, crop, atol=atol):
            return placement
    return None


@pytest.fixture
def no_network(monkeypatch):
    """Make every connection attempt fail at once, as on an offline machine."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- CIFAR -----------------------------------------------------------------


def test_cifar10_reads_pickled_batches(tmp_path):
    train_data, train_labels, test_data, test_labels = write_cifar10(tmp_path)
    train_set, val_set, num_classes = build_datasets("cifar10", tmp_path)

    assert num_classes == 10
    assert len(train_set) == 15 and len(val_set) == 5
    assert [val_set[i][1] for i in range(len(val_set))] == test_labels
    assert [int(label) for label in train_set.labels] == train_labels
    assert train_set.classes[0] == "airplane" and len(train_set.classes) == 10

    image, label = val_set[2]
    assert image.dtype == torch.float32 and image.shape == (3, CIFAR_SIDE_PX, CIFAR_SIDE_PX)
    assert isinstance(label, int)
    pixels = _unnormalise(image, "cifar10")
    # A CIFAR row holds the 1024 red bytes, then green, then blue, each row-major.
    channel, y, x = 1, 5, 7
    byte = test_data[2, channel * CIFAR_PLANE_BYTES + y * CIFAR_SIDE_PX + x]
    assert pixels[channel, y, x].item() == pytest.approx(byte / 255, abs=1e-5)
    expected = torch.from_numpy(test_data[2].reshape(3, CIFAR_SIDE_PX, CIFAR_SIDE_PX)).float() / 255
    assert torch.allclose(pixels, expected, atol=1e-5)


def test_cifar10_train_augmentation_is_random_crop_and_flip(tmp_path):
    write_cifar10(tmp_path)
    train_set, _, _ = build_datasets("cifar10", tmp_path)
    original = torch.from_numpy(train_set.images[0]).permute(2, 0, 1).float() / 255
    # RandomCrop pads with black, which is 0 before normalisation.
    padded = torch.nn.functional.pad(original, (CIFAR_PAD_PX,) * 4)

    torch.manual_seed(0)
    placements = []
    for _ in range(12):
        image, _ = train_set[0]
        assert image.shape == (3, CIFAR_SIDE_PX, CIFAR_SIDE_PX)
        placement = _matching_crop(_unnormalise(image, "cifar10"), padded, CIFAR_SIDE_PX, CIFAR_PAD_PX,
                                   with_flips=True, atol=1e-5)
        assert placement is not None, "train image is not a padded crop (or its mirror) of the original"
        placements.append(placement)
    assert len(set(placements)) > 1
    assert {flipped for _, _, flipped in placements} == {False, True}
    assert any((top, left) != (CIFAR_PAD_PX, CIFAR_PAD_PX) for top, left, _ in placements)

    torch.manual_seed(0)
    first = train_set[0][0]
    torch.manual_seed(0)
    assert torch.equal(train_set[0][0], first)


def test_cifar10_accepts_str_keys_like_python2_pickles(tmp_path):
    write_cifar10(tmp_path, bytes_keys=False)
    train_set, val_set, _ = build_datasets("cifar10", str(tmp_path))
    assert len(train_set) == 15 and len(val_set) == 5


def test_cifar100_reads_fine_labels(tmp_path):
    train_labels, test_labels = write_cifar100(tmp_path)
    train_set, val_set, num_classes = build_datasets("cifar100", tmp_path)
    assert num_classes == 100
    assert len(train_set) == 7 and len(val_set) == 4
    assert [train_set[i][1] for i in range(7)] == train_labels
    assert [val_set[i][1] for i in range(4)] == test_labels
    assert val_set[0][0].shape == (3, CIFAR_SIDE_PX, CIFAR_SIDE_PX)
    assert train_set.classes[99] == "fine_99"


def test_cifar_batches_collate_in_a_data_loader(tmp_path):
    write_cifar10(tmp_path)
    train_set, _, _ = build_datasets("cifar10", tmp_path)
    images, labels = next(iter(DataLoader(train_set, batch_size=4)))
    assert images.shape == (4, 3, CIFAR_SIDE_PX, CIFAR_SIDE_PX) and images.dtype == torch.float32
    assert labels.dtype == torch.int64


def test_cifar10_missing_folder_says_where_and_download(tmp_path):
    with pytest.raises(DataError) as info:
        build_datasets("cifar10", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "--download" in message and "\n" not in message


def test_cifar100_missing_file_is_named(tmp_path):
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataError, match=r"lacks meta;.*--download"):
        build_datasets("cifar100", tmp_path)


def test_cifar_without_data_path(tmp_path):
    with pytest.raises(DataError, match="--data_path"):
        build_datasets("cifar10", None)


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_download_without_network(tmp_path, no_network, name, folder):
    with pytest.raises(DataError) as info:
        build_datasets(name, tmp_path, download=True)
    message = str(info.value)
    assert "download" in message and "failed" in message and "no network" in message
    assert str(tmp_path / folder) in message and "\n" not in message


def test_cifar_download_skipped_when_files_present(tmp_path, no_network):
    write_cifar10(tmp_path)
    train_set, _, _ = build_datasets("cifar10", tmp_path, download=True)
    assert len(train_set) == 15


def test_cifar_garbage_pickle_is_corrupt(tmp_path):
    write_cifar10(tmp_path)
    bad_file = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad_file.write_bytes(b"\x00\x13not a pickle at all" * 10)
    with pytest.raises(DataError) as info:
        build_datasets("cifar10", tmp_path)
    message = str(info.value)
    assert str(bad_file) in message and "corrupt" in message and "\n" not in message


def test_cifar_truncated_pickle_is_corrupt(tmp_path):
    write_cifar10(tmp_path)
    bad_file = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad_file.write_bytes(bad_file.read_bytes()[:100])
    with pytest.raises(DataError, match="corrupt"):
        build_datasets("cifar10", tmp_path)


def test_cifar_wrong_array_shape_is_corrupt(tmp_path):
    write_cifar10(tmp_path)
    dump_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_1",
          {b"data": np.zeros((3, 100), dtype=np.uint8), b"labels": [0, 1, 2]})
    with pytest.raises(DataError, match="corrupt.*uint8"):
        build_datasets("cifar10", tmp_path)


def test_cifar_garbage_meta_is_corrupt(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(b"garbage")
    with pytest.raises(DataError, match="batches.meta is corrupt"):
        build_datasets("cifar10", tmp_path)


# --- ImageNet --------------------------------------------------------------


def test_imagenet_image_folders(tmp_path):
    write_image_folder(tmp_path, {"train": ["n01", "n02"], "val": ["n01", "n02"]})
    train_set, val_set, num_classes = build_datasets("imagenet", tmp_path)
    assert num_classes == 2
    assert len(train_set) == 6 and len(val_set) == 6
    assert train_set.classes == ["n01", "n02"]
    assert sorted({label for _, label in val_set}) == [0, 1]
    for dataset in (train_set, val_set):
        image, label = dataset[4]
        assert image.shape == (3, 224, 224) and image.dtype == torch.float32
        assert label == 1


def test_imagenet_missing_val(tmp_path):
    write_image_folder(tmp_path, {"train": ["n01", "n02"]})
    with pytest.raises(DataError) as info:
        build_datasets("imagenet", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "val") in message and "<data_path>/val/<class>/*.JPEG" in message
    assert "\n" not in message


def test_imagenet_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets("imagenet", tmp_path / "nowhere")
    with pytest.raises(DataError, match="--data_path"):
        build_datasets("imagenet", None)


def test_imagenet_split_without_class_folders(tmp_path):
    write_image_folder(tmp_path, {"train": ["n01"]})
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "stray.JPEG").write_bytes(b"")
    with pytest.raises(DataError, match="no class folders"):
        build_datasets("imagenet", tmp_path)


def test_imagenet_class_folder_without_images(tmp_path):
    write_image_folder(tmp_path, {"train": ["n01", "n02"], "val": ["n01"]})
    (tmp_path / "val" / "n02").mkdir()
    with pytest.raises(DataError, match="without images"):
        build_datasets("imagenet", tmp_path)


def test_imagenet_mismatched_classes(tmp_path):
    write_image_folder(tmp_path, {"train": ["n01", "n02"], "val": ["n01", "n03"]})
    with pytest.raises(DataError) as info:
        build_datasets("imagenet", tmp_path)
    message = str(info.value)
    assert "only in train: n02" in message and "only in val: n03" in message


# --- digits ----------------------------------------------------------------


def test_digits_split_sizes_and_stratification():
    from sklearn.datasets import load_digits

    train_set, val_set, num_classes = build_datasets("digits")
    assert num_classes == 10
    assert len(train_set) + len(val_set) == DIGITS_TOTAL_IMAGES
    # scikit-learn rounds the test share up: ceil(0.25 * 1797) = 450.
    assert (len(train_set), len(val_set)) == (1347, 450)

    all_counts = np.bincount(load_digits().target, minlength=10)
    val_counts = np.bincount(val_set.labels.numpy(), minlength=10)
    train_counts = np.bincount(train_set.labels.numpy(), minlength=10)
    assert (val_counts > 0).all() and (train_counts > 0).all()
    assert np.array_equal(val_counts + train_counts, all_counts)
    assert np.abs(val_counts - DIGITS_TEST_FRACTION * all_counts).max() <= 1


def test_digits_split_is_fixed_and_images_are_3x32x32():
    first_train, first_val, _ = build_datasets("digits")
    second_train, second_val, _ = build_datasets("digits")
    assert torch.equal(first_val.labels, second_val.labels)
    assert torch.equal(first_train.labels, second_train.labels)
    image, label = first_val[10]
    assert torch.equal(image, second_val[10][0]) and label == second_val[10][1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    pixels = _unnormalise(image, "digits")
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4


def test_digits_train_crop_without_flip():
    train_set, val_set, _ = build_datasets("digits")
    stored = train_set.images[3]
    padded = torch.nn.functional.pad(stored, (DIGITS_PAD_PX,) * 4)

    torch.manual_seed(1)
    placements = set()
    for _ in range(12):
        image, _ = train_set[3]
        assert image.shape == (3, 32, 32)
        placement = _matching_crop(image[:1], padded, 32, DIGITS_PAD_PX, with_flips=False, atol=0)
        assert placement is not None, "train digit is not a padded crop of the stored image"
        placements.add(placement)
    assert len(placements) > 1
    # Val images are never augmented.
    assert torch.equal(val_set[5][0], val_set.images[5].repeat(3, 1, 1))


# --- fake ------------------------------------------------------------------


def test_fake_is_deterministic():
    train_set, val_set, num_classes = build_datasets("fake", fake_size=(20, 8))
    again_train, _, _ = build_datasets("fake", fake_size=(20, 8))
    assert num_classes == 10 and len(train_set) == 20 and len(val_set) == 8
    image, label = train_set[7]
    torch.manual_seed(123)
    assert torch.equal(train_set[7][0], image)
    assert torch.equal(again_train[7][0], image) and again_train[7][1] == label
    assert not torch.equal(val_set[7][0], image)
    assert {train_set[i][1] for i in range(20)} == set(range(10))


def test_fake_shapes_and_labels():
    train_set, val_set, num_classes = build_datasets("fake", fake_size=(6, 3), fake_image_size=224,
                                                     fake_num_classes=4)
    assert num_classes == 4
    image, label = val_set[2]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert all(0 <= train_set[i][1] < 4 for i in range(6))
    with pytest.raises(IndexError):
        train_set[6]


def test_fake_classes_are_learnable():
    train_set, _, _ = build_datasets("fake", fake_size=(200, 10))
    channel_means = torch.stack([train_set[i][0].mean(dim=(1, 2)) for i in range(200)])
    labels = torch.tensor([train_set[i][1] for i in range(200)])
    centroids = torch.stack([channel_means[labels == c].mean(0) for c in range(10)])
    nearest = torch.cdist(channel_means, centroids).argmin(1)
    assert (nearest == labels).float().mean() > 0.5


def test_fake_bad_size():
    with pytest.raises(DataError, match="fake"):
        build_datasets("fake", fake_size=(0, 5))
    with pytest.raises(DataError, match="pair"):
        build_datasets("fake", fake_size=5)


# --- names and info ---------------------------------------------------------


def test_unknown_name_lists_known_names():
    with pytest.raises(DataError) as info:
        build_datasets("mnist")
    message = str(info.value)
    assert "mnist" in message and all(name in message for name in DATASETS)
    with pytest.raises(DataError):
        dataset_info("mnist")


def test_dataset_info():
    assert dataset_info("cifar10") == {"num_classes": 10, "image_size": 32,
                                       "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}
    assert dataset_info("cifar100")["num_classes"] == 100
    assert dataset_info("imagenet")["image_size"] == 224
    assert dataset_info("digits")["image_size"] == 32
    fake = dataset_info("fake", fake_image_size=64, fake_num_classes=3)
    assert fake["image_size"] == 64 and fake["num_classes"] == 3


def test_digits_constants_match_the_data():
    train_set, val_set, _ = build_datasets("digits")
    info = dataset_info("digits")
    grey = torch.cat([train_set.images, val_set.images])
    pixels = grey * info["std"][0] + info["mean"][0]
    assert pixels.mean().item() == pytest.approx(info["mean"][0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(info["std"][0], abs=1e-3)
