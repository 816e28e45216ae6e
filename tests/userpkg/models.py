"""Model factories in the form hpcdistill calls: factory(*, input_shape, num_classes, **args)."""

import torch
from torch import nn


def bn_net(*, input_shape, num_classes, width=8, dropout=0.1):
    """Conv3x3 -> BatchNorm -> ReLU -> Flatten -> Dropout -> Linear (a BatchNorm model: running stats)."""
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(dropout), nn.Linear(width * h * w, num_classes))


class Tagger(nn.Module):
    """Token data: ids (B, T) -> per-token logits (B, T, V)."""

    def __init__(self, vocab, dim):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, x):
        return self.out(torch.relu(self.emb(x)))


def tagger(*, input_shape, num_classes, dim=16):
    return Tagger(num_classes, dim)


# --- factories that misbehave, each a bad-input case ---------------------------------------------
def raises(**kwargs):
    raise RuntimeError("the factory is broken on purpose")


def not_a_module(**kwargs):
    return {"weights": [1, 2, 3]}


def wrong_classes(*, input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes + 1))


not_callable = 42
