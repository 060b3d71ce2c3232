"""CIFAR batches made on the training device (``--gpu_data``): no worker processes, no host copies.

The whole uint8 training set (50,000 x 32 x 32 x 3 = 150 MB) lives on the device; every batch is
gathered, augmented and normalised there with the standard CIFAR recipe, reproduced per image:
zero-pad 4 pixels, crop 32 x 32 at a uniform offset in [0, 8], flip horizontally with probability
1/2, scale to [0, 1], normalise. Padding happens before normalisation, as torchvision's
``RandomCrop(32, padding=4)`` pads the PIL image with black, so padded pixels equal ``-mean/std``.
Randomness comes from a CPU generator seeded per epoch, so runs are reproducible and resumable.
"""
import math

import torch
import torch.nn.functional as F


def crop_flip(images, offset_y, offset_x, flip, padding):
    """Per-image random crop of zero-padded ``images`` (B x C x H x W, any dtype) and horizontal flip.

    ``offset_y``/``offset_x`` (B, ints in [0, 2*padding]) are the top-left corners in the padded
    image, ``flip`` (B, bool) mirrors the crop. Returns a B x C x H x W tensor.
    """
    b, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offset_y[:, None] + torch.arange(h, device=images.device)           # B x H
    cols = offset_x[:, None] + torch.arange(w, device=images.device)           # B x W
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # B x H x W x C
    return out.permute(0, 3, 1, 2)


class DeviceLoader:
    """Iterates over a uint8 image set held on ``device`` in batches of normalised float images.

    ``images``: N x H x W x C uint8 (CIFAR's layout), ``labels``: N ints. ``train`` shuffles and
    augments; otherwise batches come in order, unaugmented. ``rank``/``world_size`` shard each
    epoch's order (every ``world_size``-th index) for DDP; in training the order is first padded by
    wrapping around to a multiple of ``world_size``, as DistributedSampler does, so every process
    runs the same number of steps. ``generator`` is a CPU generator that the training loop reseeds
    every epoch.
    """

    def __init__(self, images, labels, batch_size, mean, std, device, train, generator=None,
                 padding=4, rank=0, world_size=1, drop_last=False):
        self.images = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.batch_size, self.train, self.padding = batch_size, train, padding
        self.generator = generator if generator is not None else torch.Generator()
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last

    def _indices(self):
        n = len(self.labels)
        if not self.train:
            return torch.arange(n)[self.rank::self.world_size]
        order = torch.randperm(n, generator=self.generator)
        padded = math.ceil(n / self.world_size) * self.world_size
        order = torch.cat([order, order[:padded - n]])
        return order[self.rank::self.world_size]

    def _count(self):
        n = len(self.labels)
        return math.ceil(n / self.world_size) if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self):
        count = self._count()
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self):
        order = self._indices()
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            images = self.images[idx.to(self.images.device)]
            if self.train:
                b, span = len(idx), 2 * self.padding + 1
                oy = torch.randint(span, (b,), generator=self.generator).to(images.device)
                ox = torch.randint(span, (b,), generator=self.generator).to(images.device)
                flip = (torch.rand(b, generator=self.generator) < 0.5).to(images.device)
                images = crop_flip(images, oy, ox, flip, self.padding)
            images = (images.float() - self.mean) / self.std
            yield images, self.labels[idx.to(self.labels.device)]
