"""Training and validation data: an ImageFolder decoded by torchvision, or generated images.

Images are decoded with ``torchvision.io.decode_image`` (JPEG, PNG, WebP, GIF; PIL for the rest of
ImageFolder's formats) into uint8 tensors and augmented with ``torchvision.transforms.v2``: a random
resized crop and a flip for training, resize + centre crop (crop ratio 0.875) for validation, then
floats in [0, 1], ImageNet-normalised unless the SSL wrapper normalises itself (Dino).

Sharding: training uses a ``DistributedSampler`` (shuffled by ``seed`` and epoch, ``drop_last`` so every
rank takes the same number of equal batches: DDP and FSDP need it). Validation gives rank ``r`` the
images ``r, r + world, ...``, padded to the same count with images marked not to be counted, so the
summed top-1 is exact and every rank runs the same number of forwards (FSDP2 all-gathers in each).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .config import TrainError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "image_folder", "SyntheticImages", "train_loader", "val_loader",
           "transforms"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _decode(path: str) -> torch.Tensor:
    """``(3, h, w)`` uint8: torchvision's decoders, PIL for formats they do not read (BMP, TIFF, ...) and
    for torchvision versions without them (0.29 deprecates them in favour of TorchCodec)."""
    try:
        from torchvision.io import ImageReadMode, decode_image

        return decode_image(path, mode=ImageReadMode.RGB)
    except (ImportError, RuntimeError, TypeError):  # TypeError: a torchvision whose decode_image takes no path
        from torchvision.datasets.folder import pil_loader
        from torchvision.transforms.v2.functional import pil_to_tensor

        return pil_to_tensor(pil_loader(path))


def transforms(image_size: tuple, train: bool, normalize: bool):
    """uint8 ``(3, h, w)`` -> float ``(3, *image_size)``."""
    from torchvision.transforms import v2

    if train:
        steps = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        resize = tuple(int(math.floor(s / 0.875)) for s in image_size)
        steps = [v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if normalize:
        steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return v2.Compose(steps)


def image_folder(root: str, image_size: tuple, train: bool, normalize: bool, flag: str = "--data"):
    """``torchvision.datasets.ImageFolder`` at ``root``; a ``TrainError`` naming ``flag`` when it is unusable."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(root, transform=transforms(image_size, train, normalize), loader=_decode)
    except (FileNotFoundError, RuntimeError) as e:  # no class folder, or a class folder without images
        raise TrainError(f"{flag} {root}: {e}") from None


DIGITS = "digits"  # --data digits: scikit-learn's bundled handwritten digits, no download
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # the split never depends on --seed: every run is scored on the same 359 images


def _digits_arrays() -> tuple:
    """``(images (1797, 8, 8) float in [0, 1], labels (1797,) int64)`` from ``sklearn.datasets.load_digits``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.from_numpy(digits.images).float() / 16.0, torch.from_numpy(digits.target).long()


class DigitsImages(Dataset):
    """scikit-learn's handwritten digits (1797 8 x 8 grey images, 10 classes, bundled with the package: no
    download), upsampled bilinearly to ``image_size`` and repeated over ``channels``: a real, tiny data set
    for examples and CI. ``train=True`` is a fixed 80% of it, ``train=False`` the other 20% (359 images;
    the split is seeded by `DIGITS_SPLIT_SEED`, not by the run's seed)."""

    def __init__(self, image_size: tuple, train: bool, normalize: bool, channels: int = 3):
        images, labels = _digits_arrays()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
        n_test = int(round(len(labels) * DIGITS_TEST_FRACTION))
        keep = order[n_test:] if train else order[:n_test]
        images = torch.nn.functional.interpolate(images[keep, None], size=tuple(image_size), mode="bilinear",
                                                 align_corners=False).clamp(0, 1)
        self.images = images.expand(-1, channels, -1, -1).contiguous()  # (n, c, h, w)
        if normalize and channels == 3:
            mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            self.images = (self.images - mean) / std
        self.labels = labels[keep]
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


class SyntheticImages(Dataset):
    """``length`` generated images in [0, 1] and labels ``i % num_classes``: noise around a colour per class,
    so a classifier can learn them. Image ``i`` depends only on ``(i, seed)``."""

    def __init__(self, length: int, image_size: tuple, num_classes: int, normalize: bool, seed: int = 0):
        self.length, self.image_size, self.num_classes, self.seed = length, tuple(image_size), num_classes, seed
        self.colours = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(seed))
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) if normalize else None
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1) if normalize else None
        self.classes = [f"class_{c}" for c in range(num_classes)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        label = index % self.num_classes
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        img = 0.5 * torch.rand(3, *self.image_size, generator=g) + 0.5 * self.colours[label]  # (3, h, w)
        if self.mean is not None:
            img = (img - self.mean) / self.std
        return img, label


def train_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int, workers: int,
                 pin_memory: bool) -> DataLoader:
    """Shuffled, sharded, equal full batches on every rank (``sampler.set_epoch`` reshuffles)."""
    if len(dataset) < batch_size * world_size:
        raise TrainError(f"the training data has {len(dataset)} images; --batch-size {batch_size} on "
                         f"{world_size} rank(s) needs at least {batch_size * world_size} for one step")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=pin_memory, persistent_workers=False)


class _RankShard(Dataset):
    """Rank ``rank``'s images ``rank, rank + world, ...``, padded to ``ceil(n / world)``; padding has label -1."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.length = math.ceil(len(dataset) / world_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        global_index = index * self.world_size + self.rank
        if global_index >= len(self.dataset):
            img, _ = self.dataset[0]
            return img, -1
        return self.dataset[global_index]


def val_loader(dataset: Optional[Dataset], batch_size: int, rank: int, world_size: int, workers: int,
               pin_memory: bool) -> Optional[DataLoader]:
    if dataset is None:
        return None
    return DataLoader(_RankShard(dataset, rank, world_size), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=pin_memory)
