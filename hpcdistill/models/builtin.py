"""The built-in architectures, as factories of the same form as a user's: `factory(*, input_shape,
num_classes, **args) -> nn.Module`. Their presets (sizes) are entries of the table in
`hpcdistill.models`; nothing here knows of the registry.

Each dataset kind has a default, a "large" teacher and a "small" student, so knowledge distillation
(Hinton et al. 2015: big teacher -> small student) and codistillation (Anil et al. 2018: peers of the
same architecture) can both be run on 2 CPU cores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ModelError(ValueError):
    """A model that cannot be built: unknown name, bad arguments, a factory that fails or misbehaves."""

    exit_code = 2


def _ints(name: str, value, *, single: bool = False) -> list[int]:
    items = [value] if single else value
    if single and isinstance(value, list) or not single and not isinstance(value, (list, tuple)):
        raise ModelError(f"bad {name} {value!r}: {'a positive int' if single else 'a list of positive ints'}")
    if not (items and all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in items)):
        raise ModelError(f"bad {name} {value!r}: positive int(s)")
    return [int(i) for i in items]


def _dropout(value) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0):
        raise ModelError(f"bad dropout {value!r}: a number in [0, 1)")
    return float(value)


class MLP(nn.Module):
    """Flatten -> [Linear, ReLU, Dropout] x n -> Linear."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """[Conv3x3, ReLU, MaxPool2] per channel entry -> FC -> classes; sized for 8x8 digits."""

    def __init__(self, input_shape: list[int], channels: list[int], hidden: int,
                 num_classes: int, dropout: float):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Dropout(dropout),
                   nn.Linear(hidden, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block with causal self-attention."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for t in self.qkv(self.ln1(x)).split(d, dim=-1))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ff(self.ln2(x)))


class CharLM(nn.Module):
    """Small causal transformer: token ids (B, L) -> next-token logits (B, L, V)."""

    def __init__(self, context: int, vocab: int, layers: int, d_model: int, heads: int,
                 dropout: float):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d_model, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.shape[1]
        if n > self.context:
            raise ValueError(f"sequence length {n} exceeds the model's context {self.context}")
        x = self.drop(self.tok(idx) + self.pos(torch.arange(n, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def mlp(*, input_shape, num_classes: int, hidden=(256, 256), dropout: float = 0.1) -> nn.Module:
    """Flatten -> [Linear, ReLU, Dropout] x len(hidden) -> Linear; any input shape."""
    return MLP(math.prod(input_shape), _ints("hidden", list(hidden) if isinstance(hidden, tuple) else hidden),
               num_classes, _dropout(dropout))


def cnn(*, input_shape, num_classes: int, channels=(32, 64), hidden: int = 128, dropout: float = 0.1) -> nn.Module:
    """[Conv3x3, ReLU, MaxPool2] per channel entry -> FC -> classes; input (C, H, W)."""
    channels = _ints("channels", list(channels) if isinstance(channels, tuple) else channels)
    shape = list(input_shape)
    if len(shape) != 3:
        raise ModelError(f"cnn needs input_shape (C, H, W), got {tuple(shape)}")
    if min(shape[1:]) < 2 ** len(channels):
        raise ModelError(f"cnn with {len(channels)} pooling stages needs H, W >= {2 ** len(channels)}, "
                         f"got {tuple(shape)}")
    return CNN(shape, channels, _ints("hidden", hidden, single=True)[0], num_classes, _dropout(dropout))


def charlm(*, input_shape, num_classes: int, layers: int = 2, d_model: int = 128, heads: int = 4,
           dropout: float = 0.1) -> nn.Module:
    """Causal character transformer: token ids (B, L) -> next-token logits (B, L, V)."""
    if len(input_shape) != 1:
        raise ModelError(f"charlm needs input_shape (L,) of token ids, got {tuple(input_shape)}")
    layers, d_model, heads = (_ints(k, v, single=True)[0] for k, v in
                              (("layers", layers), ("d_model", d_model), ("heads", heads)))
    if d_model % heads:
        raise ModelError(f"d_model {d_model} is not divisible by heads {heads}")
    return CharLM(int(input_shape[0]), num_classes, layers, d_model, heads, _dropout(dropout))
