"""Dataset factories in the form hpcdistill calls: factory(split, **args) -> map-style Dataset."""

import numpy as np
import torch
from torch.utils.data import Dataset

SIZES = {"train": 960, "val": 192, "test": 192}


class Blobs(Dataset):
    """Noisy copies of `classes` random 1 x 6 x 6 prototypes; the train split adds noise drawn from torch's
    global RNG in __getitem__ (augmentation, which hpcdistill seeds per sample so it is resumable)."""

    def __init__(self, split, classes=4, seed=0, augment=0.3):
        rng = np.random.default_rng(seed)
        protos = rng.normal(0, 1, (classes, 1, 6, 6)).astype(np.float32)
        srng = np.random.default_rng([seed, list(SIZES).index(split)])
        n = SIZES[split]
        self.targets = srng.integers(0, classes, n)
        self.x = protos[self.targets] + srng.normal(0, 2.5, (n, 1, 6, 6)).astype(np.float32)
        self.num_classes = classes
        self.augment = augment if split == "train" else 0.0

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = torch.from_numpy(self.x[i])
        if self.augment:
            x = x + self.augment * torch.randn_like(x)
        return x, int(self.targets[i])


def blobs(split, **kwargs):
    return Blobs(split, **kwargs)


class Tokens(Dataset):
    """Token data: y is x shifted by one token of a fixed random cycle (learnable next-token map)."""

    def __init__(self, split, vocab=12, length=8):
        rng = np.random.default_rng(list(SIZES).index(split))
        self.nxt = np.random.default_rng(0).permutation(vocab)
        self.start = rng.integers(0, vocab, SIZES[split])
        self.length, self.num_classes = length, vocab

    def __len__(self):
        return len(self.start)

    def __getitem__(self, i):
        seq = [int(self.start[i])]
        for _ in range(self.length):
            seq.append(int(self.nxt[seq[-1]]))
        seq = torch.tensor(seq)
        return seq[:-1], seq[1:]


def tokens(split, **kwargs):
    return Tokens(split, **kwargs)


# --- factories that misbehave ----------------------------------------------------------------------
class _NoClasses(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.zeros(1, 6, 6), 0


def no_num_classes(split):
    return _NoClasses()


def raises(split):
    raise OSError(f"cannot open the {split} files")


def not_a_dataset(split):
    return 42


class _Mislabelled(Blobs):
    """Blobs whose sample 500 of train is labelled 12 with 4 classes, or holds a NaN pixel."""

    def __init__(self, split, flaw):
        super().__init__(split)
        if split == "train":
            if flaw == "label":
                self.targets = self.targets.copy()
                self.targets[500] = 12
            else:
                self.x = self.x.copy()
                self.x[500, 0, 2, 2] = np.nan


def mislabelled(split, flaw="label"):
    return _Mislabelled(split, flaw)
