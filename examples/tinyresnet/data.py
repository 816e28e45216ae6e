"""scikit-learn's handwritten digits as a dataset factory for hpcdistill.

hpcdistill calls a dataset factory as ``factory(split, **dataset_args)`` for split in "train", "val",
"test", with ``dataset_args`` from the JSON object in HPCDISTILL_DATASET_ARGS, and expects a
map-style ``torch.utils.data.Dataset`` of ``(x, y)`` pairs (x a float tensor, y an int) with an int
attribute ``num_classes``.

Augmentation draws from torch's *global* RNG inside ``__getitem__``: hpcdistill seeds the global
torch/numpy/python RNGs before every ``__getitem__`` call from (seed, epoch, index), which makes the
augmentation deterministic and resumable. A private ``torch.Generator`` here would defeat that.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")
TEST_SIZE, VAL_SIZE = 360, 180  # of 1797: train 1257, val 180, test 360


@lru_cache(maxsize=None)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships with scikit-learn: nothing is downloaded

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # pixels 0..16 -> [0, 1]
    return x, d.target.astype(np.int64)


@lru_cache(maxsize=None)
def _split_rows(seed: int) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, y = _load()
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=TEST_SIZE, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=VAL_SIZE, stratify=y[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


class Digits(Dataset):
    """8x8 digits: x float32 [1, 8, 8] in [0, 1], y an int in 0..9."""

    num_classes = 10

    def __init__(self, split: str, *, augment: bool, seed: int, noise: float, max_shift: int):
        x, y = _load()
        rows = _split_rows(seed)[split]
        self.split = split
        self.x = torch.from_numpy(x[rows])
        self.targets = [int(v) for v in y[rows]]  # labels without loading x (class counts, filters)
        self.augment = bool(augment) and split == "train"
        self.noise = float(noise)
        self.max_shift = int(max_shift)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        x = self.x[index]
        if self.augment:
            m = self.max_shift
            if m > 0:
                # shift by (dy, dx) in [-m, m], zero-filled (not wrapped): pad, then crop
                dy, dx = (int(v) for v in torch.randint(-m, m + 1, (2,)))
                h, w = x.shape[-2:]
                x = F.pad(x, (m, m, m, m))[:, m - dy:m - dy + h, m - dx:m - dx + w]
            if self.noise > 0:
                x = (x + self.noise * torch.randn(x.shape)).clamp_(0.0, 1.0)
            x = x.contiguous()
        return x, self.targets[index]

    def __repr__(self) -> str:
        return (f"Digits(split={self.split!r}, n={len(self)}, augment={self.augment}, "
                f"noise={self.noise}, max_shift={self.max_shift})")


def digits(split: str, *, augment: bool = True, seed: int = 0, noise: float = 0.05, max_shift: int = 1) -> Digits:
    """The `split` ("train" 1257, "val" 180, "test" 360 examples) of scikit-learn's digits.

    seed: the stratified train/val/test split (seed 0 gives the same split as hpcdistill's built-in
          `digits`); it is not the training seed, so keep it fixed across runs that are compared.
    augment, noise, max_shift: in the train split only, shift each image by up to `max_shift` pixels
          in each direction (zero-filled) and add Gaussian noise of std `noise` (then clip to [0, 1]);
          val and test are never augmented.
    """
    if split not in SPLITS:
        raise ValueError(f"digits: split {split!r}: expected one of {', '.join(SPLITS)}")
    if int(max_shift) < 0 or int(max_shift) > 3:
        raise ValueError(f"digits: max_shift {max_shift}: expected 0..3 pixels (the images are 8x8)")
    if float(noise) < 0:
        raise ValueError(f"digits: noise {noise}: expected a standard deviation >= 0")
    if int(seed) < 0:
        raise ValueError(f"digits: seed {seed}: expected a non-negative integer")
    return Digits(split, augment=augment, seed=int(seed), noise=noise, max_shift=max_shift)
