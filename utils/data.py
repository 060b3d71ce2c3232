"""Training and validation datasets for the LCR-BNN experiments.

Builds CIFAR-10/100 (read from torchvision's on-disk pickle format), ImageNet
(class folders), scikit-learn's bundled digits (works offline) and a synthetic
``fake`` set for smoke runs. Every dataset yields ``(image, label)`` with
``image`` a normalised float tensor of shape C x H x W and ``label`` an int.
Any problem with the data surfaces as :class:`DataError` whose message is one
line saying what to do about it.
"""

import math
import os
import pickle
import sys
import warnings
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate
from torchvision import datasets as tv_datasets
from torchvision import transforms
from torchvision.datasets import utils as tv_download

DATASETS = ("cifar10", "cifar100", "imagenet", "digits", "fake")

CIFAR_IMAGE_SIZE_PX = 32
CIFAR_CROP_PADDING_PX = 4
CIFAR_CHANNELS = 3
CIFAR_ROW_BYTES = CIFAR_CHANNELS * CIFAR_IMAGE_SIZE_PX * CIFAR_IMAGE_SIZE_PX

IMAGENET_IMAGE_SIZE_PX = 224
IMAGENET_RESIZE_PX = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_NUM_CLASSES = 1000
IMAGENET_LAYOUT = "<data_path>/train/<class>/*.JPEG and <data_path>/val/<class>/*.JPEG"

DIGITS_IMAGE_SIZE_PX = 32
DIGITS_CROP_PADDING_PX = 2
DIGITS_NUM_CLASSES = 10
DIGITS_CHANNELS = 3  # grey replicated so models built for RGB take digits unchanged
DIGITS_MAX_INTENSITY = 16.0  # load_digits stores ink as integers 0..16
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
# Population mean/std over every pixel of all 1797 digits after scaling to
# [0, 1] and bilinear upsampling to 32x32 (computed once with torch); the
# image is grey, so each replicated channel shares the same value.
DIGITS_MEAN = (0.3053, 0.3053, 0.3053)
DIGITS_STD = (0.3236, 0.3236, 0.3236)

# Fake images are unit Gaussian noise around a small per-class colour, so they
# are already roughly normalised.
FAKE_MEAN = (0.0, 0.0, 0.0)
FAKE_STD = (1.0, 1.0, 1.0)
FAKE_CHANNELS = 3
FAKE_CLASS_OFFSET_SCALE = 0.5  # in noise standard deviations; small keeps the task only weakly learnable
FAKE_CLASS_OFFSET_SEED = 0
FAKE_SPLIT_IDS = {"train": 0, "val": 1}

MAX_NAMES_IN_MESSAGE = 5


class DataError(Exception):
    """Bad or missing data; the message is one line saying what to do."""


class _CifarSpec:
    """Where one CIFAR variant lives on disk and how its pickles are keyed."""

    def __init__(self, label, torchvision_class, train_files, test_files, meta_file,
                 meta_key, label_key, num_classes, mean, std):
        self.label = label
        self.torchvision_class = torchvision_class
        self.folder_name = torchvision_class.base_folder
        self.train_files = train_files
        self.test_files = test_files
        self.meta_file = meta_file
        self.meta_key = meta_key
        self.label_key = label_key
        self.num_classes = num_classes
        self.mean = mean
        self.std = std

    @property
    def all_files(self):
        return self.train_files + self.test_files + (self.meta_file,)


_CIFAR_SPECS = {
    "cifar10": _CifarSpec(
        label="CIFAR-10",
        torchvision_class=tv_datasets.CIFAR10,
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        meta_key="label_names",
        label_key="labels",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _CifarSpec(
        label="CIFAR-100",
        torchvision_class=tv_datasets.CIFAR100,
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        meta_key="fine_label_names",
        label_key="fine_labels",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def _one_line(text):
    return " ".join(str(text).split())


def _short_list(names):
    names = sorted(names)
    shown = ", ".join(names[:MAX_NAMES_IN_MESSAGE])
    if len(names) > MAX_NAMES_IN_MESSAGE:
        shown += f", ... ({len(names)} in all)"
    return shown


def _check_name(name):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def _resolve_path(name, data_path):
    if data_path is None:
        raise DataError(f"dataset {name!r} needs a data folder; pass --data_path pointing at it")
    return os.path.abspath(os.path.expanduser(os.fspath(data_path)))


def dataset_info(name, fake_image_size=32, fake_num_classes=10):
    """Return ``{"num_classes", "image_size", "mean", "std"}`` for a dataset name.

    ``image_size`` is the side in pixels of the square tensors the dataset
    yields; ``mean``/``std`` are the per-channel normalisation constants.
    """
    _check_name(name)
    if name in _CIFAR_SPECS:
        spec = _CIFAR_SPECS[name]
        return {"num_classes": spec.num_classes, "image_size": CIFAR_IMAGE_SIZE_PX,
                "mean": spec.mean, "std": spec.std}
    if name == "imagenet":
        return {"num_classes": IMAGENET_NUM_CLASSES, "image_size": IMAGENET_IMAGE_SIZE_PX,
                "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if name == "digits":
        return {"num_classes": DIGITS_NUM_CLASSES, "image_size": DIGITS_IMAGE_SIZE_PX,
                "mean": DIGITS_MEAN, "std": DIGITS_STD}
    return {"num_classes": int(fake_num_classes), "image_size": int(fake_image_size),
            "mean": FAKE_MEAN, "std": FAKE_STD}


def build_datasets(name, data_path=None, download=False, fake_size=(512, 256),
                   fake_image_size=32, fake_num_classes=10):
    """Return ``(train_set, val_set, num_classes)`` for a dataset name.

    Both sets are torch Datasets yielding ``(float tensor C x H x W normalised,
    int label)``. ``data_path`` is needed for CIFAR and ImageNet only;
    ``download`` only applies to CIFAR; the ``fake_*`` arguments only to
    ``fake``.
    """
    _check_name(name)
    if name in _CIFAR_SPECS:
        return _build_cifar(_CIFAR_SPECS[name], name, data_path, download)
    if name == "imagenet":
        return _build_imagenet(data_path)
    if name == "digits":
        return DigitsDataset(train=True), DigitsDataset(train=False), DIGITS_NUM_CLASSES
    return _build_fake(fake_size, fake_image_size, fake_num_classes)


# --- CIFAR -----------------------------------------------------------------


def _corrupt(label, path, reason):
    return DataError(f"{label} file {path} is corrupt ({reason}); "
                     "delete it and pass --download, or replace it with an intact copy")


# What CIFAR's pickles hold besides dicts, lists, ints and strings: numpy arrays, which pickle as
# the three numpy globals (numpy 2 moved numpy.core to numpy._core), and, in files that Python 3
# writes with protocol 2, bytes, which pickle as _codecs.encode(text, "latin1").
_CIFAR_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds nothing but what CIFAR's files hold, so a crafted file runs no code."""

    def find_class(self, module, name):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR file never holds")
        return super().find_class(module, name)


def _read_pickle(path, label):
    try:
        with open(path, "rb") as handle:
            # CIFAR's pickles come from Python 2; latin1 is the decoding that
            # keeps their numpy byte buffers intact.
            entry = _CifarUnpickler(handle, encoding="latin1").load()
    # Unpickling garbage can fail with almost any exception type.
    except Exception as err:
        raise _corrupt(label, path, f"{type(err).__name__}: {_one_line(err)}") from err
    if not isinstance(entry, dict):
        raise _corrupt(label, path, f"holds a {type(entry).__name__}, not a dict")
    # Pickles written by Python 3 keep bytes keys; accept both spellings.
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}


def _read_cifar_batches(spec, folder, files):
    arrays, labels = [], []
    for file_name in files:
        path = os.path.join(folder, file_name)
        entry = _read_pickle(path, spec.label)
        if "data" not in entry or spec.label_key not in entry:
            raise _corrupt(spec.label, path, f"missing key 'data' or '{spec.label_key}'")
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
            raise _corrupt(spec.label, path,
                           f"'data' is {data.dtype} {data.shape}, expected uint8 N x {CIFAR_ROW_BYTES}")
        batch_labels = np.asarray(entry[spec.label_key])
        if batch_labels.shape != (data.shape[0],) or not np.issubdtype(batch_labels.dtype, np.integer):
            raise _corrupt(spec.label, path, f"'{spec.label_key}' does not hold one integer per image")
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= spec.num_classes):
            raise _corrupt(spec.label, path, f"labels outside 0..{spec.num_classes - 1}")
        arrays.append(data)
        labels.append(batch_labels.astype(np.int64))
    # Each row stores the 1024 red bytes, then green, then blue, row-major.
    images = np.concatenate(arrays).reshape(-1, CIFAR_CHANNELS, CIFAR_IMAGE_SIZE_PX, CIFAR_IMAGE_SIZE_PX)
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1)), np.concatenate(labels)


def _read_cifar_classes(spec, folder):
    path = os.path.join(folder, spec.meta_file)
    entry = _read_pickle(path, spec.label)
    names = entry.get(spec.meta_key)
    if not isinstance(names, (list, tuple)) or len(names) != spec.num_classes:
        raise _corrupt(spec.label, path, f"'{spec.meta_key}' is not a list of {spec.num_classes} names")
    return [name.decode("latin1") if isinstance(name, bytes) else str(name) for name in names]


class CifarBatches(Dataset):
    """One split of CIFAR-10/100 read from torchvision's pickle batches.

    torchvision's own CIFAR classes insist on the md5 of the official files,
    so they reject any other file in the same format; this reader checks the
    format instead.
    """

    def __init__(self, images_hwc, labels, classes, transform):
        self.images = images_hwc
        self.labels = labels
        self.classes = classes
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index])
        return self.transform(image), int(self.labels[index])


def _missing_cifar_files(spec, folder):
    return [name for name in spec.all_files if not os.path.isfile(os.path.join(folder, name))]


def _download_cifar(spec, root, folder):
    tv_class = spec.torchvision_class
    try:
        tv_download.download_and_extract_archive(tv_class.url, root, filename=tv_class.filename,
                                                 md5=tv_class.tgz_md5)
    # urllib, tarfile and torchvision's md5 check each raise their own types.
    except Exception as err:
        raise DataError(
            f"downloading {spec.label} from {tv_class.url} failed ({type(err).__name__}: {_one_line(err)}; "
            f"no network?); fetch {tv_class.filename} by hand and extract it into {root} so that {folder} "
            f"holds {', '.join(spec.all_files)}"
        ) from err


def _build_cifar(spec, name, data_path, download):
    root = _resolve_path(name, data_path)
    folder = os.path.join(root, spec.folder_name)
    missing = _missing_cifar_files(spec, folder)
    if missing and download:
        _download_cifar(spec, root, folder)
        missing = _missing_cifar_files(spec, folder)
    if missing and not os.path.isdir(folder):
        raise DataError(
            f"{spec.label} not found: expected folder {folder} holding {', '.join(spec.all_files)}; "
            "pass --download to fetch it, or place the files there"
        )
    if missing:
        raise DataError(
            f"{spec.label} incomplete: {folder} lacks {', '.join(missing)}; "
            "pass --download to fetch it, or place the files there"
        )
    classes = _read_cifar_classes(spec, folder)
    normalise = transforms.Normalize(spec.mean, spec.std)
    train_transform = transforms.Compose([
        transforms.RandomCrop(CIFAR_IMAGE_SIZE_PX, padding=CIFAR_CROP_PADDING_PX),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalise,
    ])
    val_transform = transforms.Compose([transforms.ToTensor(), normalise])
    train_set = CifarBatches(*_read_cifar_batches(spec, folder, spec.train_files), classes, train_transform)
    val_set = CifarBatches(*_read_cifar_batches(spec, folder, spec.test_files), classes, val_transform)
    return train_set, val_set, spec.num_classes


# --- ImageNet --------------------------------------------------------------


def imagenet_train_transform():
    """Training preset: random resized crop to 224, horizontal flip, normalise."""
    return transforms.Compose([transforms.RandomResizedCrop(IMAGENET_IMAGE_SIZE_PX), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def imagenet_val_transform(image_size=IMAGENET_IMAGE_SIZE_PX, resize=IMAGENET_RESIZE_PX):
    """Validation preset: resize the short side to 256, centre crop 224, normalise."""
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def imagenet_c_transform(image_size=IMAGENET_IMAGE_SIZE_PX):
    """ImageNet-C preset: the images are stored at 224 x 224 already, so centre crop 224 and
    normalise, with no resize (Hendrycks and Dietterich's evaluation)."""
    return transforms.Compose([transforms.CenterCrop(image_size), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# What reading an unreadable image raises: PIL's errors for missing, foreign or truncated data
# (OSError, SyntaxError, ValueError) and for a header claiming an enormous size.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                           Image.DecompressionBombWarning)


def read_rgb_image(path):
    """The image at ``path`` as RGB; a header claiming more than PIL's pixel limit is an error too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")


class ImageFolderSkippingUnreadable(tv_datasets.ImageFolder):
    """``ImageFolder`` whose unreadable images (empty, not an image, truncated, an enormous header)
    are skipped: the item is ``None`` (:func:`collate_skipping_none` drops it) and one warning line
    names the file. The epoch goes on; the training and evaluation loops report how many images
    they saw, so a skipped image never passes unnoticed."""

    def __init__(self, root, transform=None):
        super().__init__(root, transform=transform, loader=read_rgb_image)

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except UNREADABLE_IMAGE_ERRORS as err:
            print(f"warning: skipping unreadable image {path} ({type(err).__name__}: {_one_line(err)[:200]})",
                  file=sys.stderr, flush=True)
            return None
        return (self.transform(image) if self.transform is not None else image), target


def collate_skipping_none(batch):
    """``default_collate`` of the items that are not None; None when none is left."""
    batch = [item for item in batch if item is not None]
    return default_collate(batch) if batch else None


def class_folders(split_dir):
    # Same rule as torchvision's find_classes, so the lists compared here are
    # the ones ImageFolder will index.
    with os.scandir(split_dir) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir())


def _build_imagenet(data_path):
    root = _resolve_path("imagenet", data_path)
    if not os.path.isdir(root):
        raise DataError(f"ImageNet folder {root} does not exist or is not a folder; expected {IMAGENET_LAYOUT}")
    split_dirs = {split: os.path.join(root, split) for split in ("train", "val")}
    classes = {}
    for split, split_dir in split_dirs.items():
        if not os.path.isdir(split_dir):
            raise DataError(f"ImageNet split folder {split_dir} is missing; expected {IMAGENET_LAYOUT}")
        classes[split] = class_folders(split_dir)
        if not classes[split]:
            raise DataError(f"ImageNet split folder {split_dir} has no class folders; "
                            f"expected {IMAGENET_LAYOUT}")
    if classes["train"] != classes["val"]:
        only_train = set(classes["train"]) - set(classes["val"])
        only_val = set(classes["val"]) - set(classes["train"])
        raise DataError(
            f"ImageNet class folders differ between {split_dirs['train']} and {split_dirs['val']} "
            f"(only in train: {_short_list(only_train) or 'none'}; "
            f"only in val: {_short_list(only_val) or 'none'}); "
            "both splits need the same class folders"
        )
    split_transforms = {"train": imagenet_train_transform(), "val": imagenet_val_transform()}
    sets = {}
    for split, split_dir in split_dirs.items():
        try:
            sets[split] = ImageFolderSkippingUnreadable(split_dir, transform=split_transforms[split])
        # ImageFolder raises this when a class folder holds no image files.
        except FileNotFoundError as err:
            raise DataError(
                f"ImageNet split folder {split_dir} has a class folder without images ({_one_line(err)}); "
                f"expected {IMAGENET_LAYOUT}"
            ) from err
    return sets["train"], sets["val"], len(classes["train"])


# --- digits ----------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits_unit_images():
    """All 1797 digits in [0, 1], upsampled to 1 x 32 x 32, their labels and the fixed split indices."""
    # scikit-learn takes about a second to import and only digits needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX_INTENSITY
    upsampled = F.interpolate(pixels, size=(DIGITS_IMAGE_SIZE_PX, DIGITS_IMAGE_SIZE_PX),
                              mode="bilinear", align_corners=False)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION,
                                          stratify=bunch.target, random_state=DIGITS_SPLIT_SEED)
    return upsampled, labels, {True: torch.as_tensor(train_idx), False: torch.as_tensor(val_idx)}


def digits_unit_images(train):
    """One split of the digits before normalisation: ``(N x 1 x 32 x 32 in [0, 1], int64 labels)``."""
    images, labels, split = _digits_unit_images()
    return images[split[train]], labels[split[train]]


@lru_cache(maxsize=1)
def _digits_arrays():
    # Stored as one grey channel; the three channels are identical anyway.
    return {train: (normalise_digits(images), labels)
            for train, (images, labels) in ((t, digits_unit_images(t)) for t in (True, False))}


def normalise_digits(images):
    """Digits in [0, 1] (N x 1 x 32 x 32) -> the normalised grey channel the dataset yields."""
    return (images - DIGITS_MEAN[0]) / DIGITS_STD[0]


def _random_crop(image, padding_px):
    # Uses torch's global RNG so DataLoader worker seeding governs it.
    height, width = image.shape[-2:]
    padded = F.pad(image, (padding_px, padding_px, padding_px, padding_px))
    top, left = torch.randint(0, 2 * padding_px + 1, (2,)).tolist()
    return padded[:, top:top + height, left:left + width]


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits upsampled to 3 x 32 x 32, with a fixed stratified split.

    Training images get a random 32 px crop with 2 px zero padding; there is
    no horizontal flip because digits are not mirror-symmetric.
    """

    def __init__(self, train):
        self.train = bool(train)
        self.images, self.labels = _digits_arrays()[self.train]
        self.classes = [str(digit) for digit in range(DIGITS_NUM_CLASSES)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        if self.train:
            image = _random_crop(image, DIGITS_CROP_PADDING_PX)
        return image.repeat(DIGITS_CHANNELS, 1, 1), int(self.labels[index])


# --- fake ------------------------------------------------------------------


class FakeImages(Dataset):
    """Deterministic synthetic images: Gaussian noise around a per-class colour.

    Each image is drawn from a generator seeded by (split, index), so it is
    the same in every process and every epoch and nothing is kept in memory.
    """

    def __init__(self, size, image_size, num_classes, split):
        self.size = size
        self.image_size = image_size
        self.num_classes = num_classes
        self.split_id = FAKE_SPLIT_IDS[split]
        self.classes = [f"class_{label}" for label in range(num_classes)]
        offset_rng = torch.Generator().manual_seed(FAKE_CLASS_OFFSET_SEED)
        self.class_offsets = FAKE_CLASS_OFFSET_SCALE * torch.randn(num_classes, FAKE_CHANNELS, 1, 1,
                                                                   generator=offset_rng)

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} fake images")
        label = index % self.num_classes
        # Distinct from the class-offset seed and interleaved so train and val
        # never share a seed.
        seed = 1 + len(FAKE_SPLIT_IDS) * index + self.split_id
        rng = torch.Generator().manual_seed(seed)
        noise = torch.randn(FAKE_CHANNELS, self.image_size, self.image_size, generator=rng)
        return noise + self.class_offsets[label], label


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _build_fake(fake_size, fake_image_size, fake_num_classes):
    try:
        n_train, n_val = fake_size
    except (TypeError, ValueError) as err:
        raise DataError(f"fake_size must be a pair (n_train, n_val), got {fake_size!r}") from err
    n_train = _positive_int(n_train, "fake train size")
    n_val = _positive_int(n_val, "fake val size")
    image_size = _positive_int(fake_image_size, "fake image size")
    num_classes = _positive_int(fake_num_classes, "fake number of classes")
    return (FakeImages(n_train, image_size, num_classes, "train"),
            FakeImages(n_val, image_size, num_classes, "val"),
            num_classes)


# --- loaders ---------------------------------------------------------------


class ShardSampler(Sampler):
    """Every ``world_size``-th index from ``rank``, no padding: the shards cover the set exactly once."""

    def __init__(self, length, rank, world_size):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def per_rank_training_images(length, world_size):
    """Images each process trains on per epoch: DistributedSampler pads every shard to the rounded-up share."""
    return math.ceil(length / world_size)


def build_loaders(train_set, val_set, args, runtime):
    """Training and validation loaders; DDP shards both, the validation shards without padding.

    Returns ``(train, val, generator)``; the training loop reseeds ``generator`` every epoch.

    The last, incomplete training batch of each epoch is dropped, as IR-Net's trainers do
    (``drop_last=True``): a batch of a few images gives train-mode BatchNorm noisy statistics, which
    go into the running averages just before evaluation (docs/RESULTS.md, section 2). Only a
    training set smaller than one batch keeps its single, partial batch.
    """
    from utils.device_data import DeviceLoader
    per_rank = args.batch_size // runtime.world_size
    per_rank_test = max(args.batch_size_test // runtime.world_size, 1)
    if per_rank < 2:
        raise DataError(f"--batch_size {args.batch_size} over {runtime.world_size} processes leaves {per_rank} "
                        f"image per batch; BatchNorm needs at least 2: pass a larger --batch_size")
    images = per_rank_training_images(len(train_set), runtime.world_size)
    if images < 2:
        raise DataError(f"the training set has {len(train_set)} images, {images} per process; BatchNorm needs "
                        f"at least 2 per batch: use a larger training set")
    drop_last = images >= per_rank
    pin = runtime.device.type == "cuda"
    generator = torch.Generator()
    if getattr(args, "gpu_data", False):
        if not hasattr(train_set, "images") or args.dataset not in ("cifar10", "cifar100"):
            raise DataError(f"--gpu_data works with cifar10/cifar100, not {args.dataset}; drop --gpu_data")
        info = dataset_info(args.dataset)
        shard = dict(rank=runtime.rank, world_size=runtime.world_size)
        train = DeviceLoader(train_set.images, train_set.labels, per_rank, info["mean"], info["std"],
                             runtime.device, True, generator, drop_last=drop_last, **shard)
        val = DeviceLoader(val_set.images, val_set.labels, per_rank_test, info["mean"], info["std"],
                           runtime.device, False, **shard)
        return train, val, generator
    train_sampler = None
    if runtime.distributed:
        train_sampler = DistributedSampler(train_set, runtime.world_size, runtime.rank, shuffle=True, seed=args.seed)
    train = DataLoader(train_set, per_rank, shuffle=train_sampler is None, sampler=train_sampler,
                       num_workers=args.workers, pin_memory=pin, drop_last=drop_last, generator=generator,
                       collate_fn=collate_skipping_none)
    val = DataLoader(val_set, per_rank_test, shuffle=False, num_workers=args.workers, pin_memory=pin,
                     sampler=ShardSampler(len(val_set), runtime.rank, runtime.world_size),
                     collate_fn=collate_skipping_none)
    return train, val, generator
