"""Model registry and the architecture record stored in checkpoints.

A model is described by a small JSON-able *architecture record* (``arch_for``). Checkpoints store
that record next to the weights, so a teacher or peer is rebuilt from its file alone
(``build_model``) without trusting the reader's registry or unpickling code.

Each dataset kind has a default, a "large" teacher and a "small" student, so knowledge
distillation (Hinton et al. 2015: big teacher -> small student) and codistillation (Anil et al.
2018: peers of the same architecture) can both be run on 2 CPU cores.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS",
    "ModelError",
    "arch_for",
    "build_model",
    "count_parameters",
    "default_model",
]


class ModelError(ValueError):
    """Unknown model name, a family that does not fit the dataset kind, or a bad arch record."""


# name -> (dataset kind, family, family hyper-parameters)
_REGISTRY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mlp": ("image", "mlp", {"hidden": [256, 256], "dropout": 0.1}),
    # Hinton et al. 2015's MNIST teacher: 2 x 1200 ReLU with dropout.
    "mlp-large": ("image", "mlp", {"hidden": [1200, 1200], "dropout": 0.2}),
    "mlp-small": ("image", "mlp", {"hidden": [32, 32], "dropout": 0.0}),
    "cnn": ("image", "cnn", {"channels": [32, 64], "hidden": 128, "dropout": 0.1}),
    "cnn-small": ("image", "cnn", {"channels": [8, 16], "hidden": 32, "dropout": 0.0}),
    # Head width is 32 throughout, so heads = d_model / 32.
    "charlm": ("sequence", "charlm", {"layers": 2, "d_model": 128, "heads": 4, "dropout": 0.1}),
    "charlm-large": ("sequence", "charlm", {"layers": 4, "d_model": 192, "heads": 6, "dropout": 0.1}),
    "charlm-small": ("sequence", "charlm", {"layers": 1, "d_model": 64, "heads": 2, "dropout": 0.0}),
}

MODELS: dict[str, str] = {
    "mlp": "image MLP, 2 x 256 ReLU, dropout 0.1 (default for images)",
    "mlp-large": "image MLP, 2 x 1200 ReLU, dropout 0.2 (Hinton et al. 2015 teacher shape)",
    "mlp-small": "image MLP, 2 x 32 ReLU (distillation student)",
    "cnn": "image CNN, conv 32-64 + max-pool, FC 128, dropout 0.1",
    "cnn-small": "image CNN, conv 8-16 + max-pool, FC 32 (distillation student)",
    "charlm": "causal char transformer, 2 layers, d_model 128, 4 heads (default for sequences)",
    "charlm-large": "causal char transformer, 4 layers, d_model 192, 6 heads (teacher)",
    "charlm-small": "causal char transformer, 1 layer, d_model 64, 2 heads (student)",
}

_DEFAULTS = {"image": "mlp", "sequence": "charlm"}

# Keys every record of a family must carry (besides name/family/input_shape/num_classes).
_FAMILY_KEYS = {
    "mlp": {"hidden", "dropout"},
    "cnn": {"channels", "hidden", "dropout"},
    "charlm": {"layers", "d_model", "heads", "dropout"},
}
_COMMON_KEYS = {"name", "family", "input_shape", "num_classes"}


def _names(kind: str | None = None) -> str:
    return ", ".join(n for n, (k, _, _) in _REGISTRY.items() if kind is None or k == kind)


def default_model(kind: str) -> str:
    """The registry name used when no model is configured for a dataset kind."""
    try:
        return _DEFAULTS[kind]
    except KeyError:
        raise ModelError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(_DEFAULTS)}") from None


def arch_for(name: str, *, kind: str, input_shape: tuple, num_classes: int) -> dict:
    """The full architecture record for registry ``name`` on a dataset of ``kind``.

    Images: ``input_shape`` is (C, H, W) and ``num_classes`` the number of labels.
    Sequences: ``input_shape`` is (L,), the context length, and ``num_classes`` the vocabulary size
    (a char LM reads and predicts the same alphabet).
    """
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; valid models: {_names()}")
    default_model(kind)  # validates kind
    model_kind, family, params = _REGISTRY[name]
    if model_kind != kind:
        raise ModelError(f"model {name!r} is for {model_kind} data, not {kind}; "
                         f"valid {kind} models: {_names(kind)}")
    record = {
        "name": name,
        "family": family,
        "input_shape": [int(s) for s in input_shape],
        "num_classes": int(num_classes),
        **{k: list(v) if isinstance(v, list) else v for k, v in params.items()},
    }
    _validate(record)
    return record


def _validate(arch: Any) -> None:
    if not isinstance(arch, dict):
        raise ModelError(f"arch record must be a dict, got {type(arch).__name__}")
    family = arch.get("family")
    if family not in _FAMILY_KEYS:
        raise ModelError(f"arch record has unknown family {family!r}; valid families: "
                         f"{', '.join(_FAMILY_KEYS)} (models: {_names()})")
    expected = _COMMON_KEYS | _FAMILY_KEYS[family]
    if set(arch) != expected:
        missing, extra = sorted(expected - set(arch)), sorted(set(arch) - expected)
        raise ModelError(f"bad {family} arch record: missing {missing}, unexpected {extra}")
    shape, num_classes = arch["input_shape"], arch["num_classes"]
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ModelError(f"bad input_shape {shape!r}: a non-empty list of positive ints")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ModelError(f"bad num_classes {num_classes!r}: an int >= 2")
    dropout = arch["dropout"]
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ModelError(f"bad dropout {dropout!r}: a number in [0, 1)")
    for key in _FAMILY_KEYS[family] - {"dropout"}:
        value = arch[key]
        ints = value if isinstance(value, list) else [value]
        if not (ints and all(isinstance(i, int) and i > 0 for i in ints)):
            raise ModelError(f"bad {key} {value!r}: positive int(s)")
    if family == "cnn":
        if len(shape) != 3:
            raise ModelError(f"cnn needs input_shape (C, H, W), got {shape}")
        if min(shape[1:]) < 2 ** len(arch["channels"]):
            raise ModelError(f"cnn with {len(arch['channels'])} pooling stages needs H, W >= "
                             f"{2 ** len(arch['channels'])}, got {shape}")
    if family == "charlm":
        if len(shape) != 1:
            raise ModelError(f"charlm needs input_shape (L,), got {shape}")
        if arch["d_model"] % arch["heads"]:
            raise ModelError(f"d_model {arch['d_model']} is not divisible by heads {arch['heads']}")


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


def build_model(arch: dict) -> nn.Module:
    """Rebuild a model from its architecture record alone (the registry name is informational)."""
    _validate(arch)
    family, shape, classes = arch["family"], arch["input_shape"], arch["num_classes"]
    if family == "mlp":
        return MLP(math.prod(shape), list(arch["hidden"]), classes, arch["dropout"])
    if family == "cnn":
        return CNN(shape, list(arch["channels"]), arch["hidden"], classes, arch["dropout"])
    return CharLM(shape[0], classes, arch["layers"], arch["d_model"], arch["heads"], arch["dropout"])


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (frozen teachers included: it measures the model's size)."""
    return sum(p.numel() for p in model.parameters())
