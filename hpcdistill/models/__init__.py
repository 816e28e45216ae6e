"""The model registry: one table of built-in presets, and users' factories by import path.

`HPCDISTILL_MODEL` names either a preset of the table below or `package.module:callable`; either way
the model is made by a factory called `factory(*, input_shape, num_classes, **args)`, with `args` from
the preset, updated by `HPCDISTILL_MODEL_ARGS`. The *model record* stored in checkpoints and exchange
files says which factory and which (JSON) args built the weights:

    {"name": "mlp-small", "factory": "hpcdistill.models.builtin:mlp", "args": {"hidden": [32, 32], ...},
     "input_shape": [1, 8, 8], "num_classes": 10}

A file never chooses the code that runs: a record is rebuilt only with a factory the job itself named
(its own model, `HPCDISTILL_TEACHER_MODEL`) or a built-in one, and first on PyTorch's meta device, so
its size is known, and checked against the file, before any memory is spent on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from hpcdistill.config import MAX_CLASSES
from hpcdistill.imports import check_json_value, is_import_path, json_object, load_callable
from hpcdistill.models import builtin
from hpcdistill.models.builtin import ModelError

__all__ = ["MODELS", "ModelEntry", "ModelError", "ModelSpec", "BUILTIN_FACTORIES", "build_from_record",
           "count_parameters", "default_model", "manifest", "resolve_model", "spec_from_record"]

# A record's num_classes and input size beyond these are not a model anyone trains here: a crafted file.
MAX_INPUT_ELEMENTS = 2**28


@dataclass(frozen=True)
class ModelEntry:
    kind: str       # the dataset kind it is made for: "image" (any fixed-shape classification) or "sequence"
    factory: str    # key of BUILTIN_FACTORIES
    args: dict
    about: str


_MLP, _CNN, _LM = (f"hpcdistill.models.builtin:{f.__name__}" for f in (builtin.mlp, builtin.cnn, builtin.charlm))
BUILTIN_FACTORIES = {_MLP: builtin.mlp, _CNN: builtin.cnn, _LM: builtin.charlm}

# The single source of truth for built-in models: resolve_model (and so the checks before MPI and the
# error that lists valid names) and the tests read this table. Head width of the char LMs is 32
# throughout (heads = d_model / 32).
MODELS: dict[str, ModelEntry] = {
    "mlp": ModelEntry("image", _MLP, {"hidden": [256, 256], "dropout": 0.1},
                      "image MLP, 2 x 256 ReLU, dropout 0.1 (default for images)"),
    "mlp-large": ModelEntry("image", _MLP, {"hidden": [1200, 1200], "dropout": 0.2},
                            "image MLP, 2 x 1200 ReLU, dropout 0.2 (Hinton et al. 2015 teacher shape)"),
    "mlp-small": ModelEntry("image", _MLP, {"hidden": [32, 32], "dropout": 0.0},
                            "image MLP, 2 x 32 ReLU (distillation student)"),
    "cnn": ModelEntry("image", _CNN, {"channels": [32, 64], "hidden": 128, "dropout": 0.1},
                      "image CNN, conv 32-64 + max-pool, FC 128, dropout 0.1"),
    "cnn-small": ModelEntry("image", _CNN, {"channels": [8, 16], "hidden": 32, "dropout": 0.0},
                            "image CNN, conv 8-16 + max-pool, FC 32 (distillation student)"),
    "charlm": ModelEntry("sequence", _LM, {"layers": 2, "d_model": 128, "heads": 4, "dropout": 0.1},
                         "causal char transformer, 2 layers, d_model 128, 4 heads (default for sequences)"),
    "charlm-large": ModelEntry("sequence", _LM, {"layers": 4, "d_model": 192, "heads": 6, "dropout": 0.1},
                               "causal char transformer, 4 layers, d_model 192, 6 heads (teacher)"),
    "charlm-small": ModelEntry("sequence", _LM, {"layers": 1, "d_model": 64, "heads": 2, "dropout": 0.0},
                               "causal char transformer, 1 layer, d_model 64, 2 heads (student)"),
}
DEFAULT_FOR_KIND = {"image": "mlp", "sequence": "charlm"}


def default_model(kind: str) -> str:
    """The preset used when HPCDISTILL_MODEL is not set, for a dataset kind."""
    try:
        return DEFAULT_FOR_KIND[kind]
    except KeyError:
        raise ModelError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DEFAULT_FOR_KIND)}") from None


def _names(kind: str | None = None) -> str:
    return ", ".join(n for n, e in MODELS.items() if kind is None or e.kind == kind)


@dataclass(frozen=True)
class ModelSpec:
    """A factory and its keyword arguments, as the settings (or a file, for its args) give them."""

    name: str        # what the settings said: a preset name or the import path
    factory: str     # the factory's identity: its import path
    args: dict = field(default_factory=dict)
    variable: str = "HPCDISTILL_MODEL"

    @property
    def function(self):
        return BUILTIN_FACTORIES.get(self.factory) or load_callable(self.factory, self.variable)

    def build(self, input_shape, num_classes: int, device=None) -> nn.Module:
        """Call the factory; ModelError naming the variable when it raises or returns no nn.Module."""
        fn = self.function
        try:
            if device is None:
                model = fn(input_shape=tuple(int(s) for s in input_shape), num_classes=int(num_classes), **self.args)
            else:
                with torch.device(device):
                    model = fn(input_shape=tuple(int(s) for s in input_shape), num_classes=int(num_classes),
                               **self.args)
        except ModelError as exc:
            raise ModelError(f"{self.variable}={self.name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the user's factory may raise anything
            first = (str(exc).splitlines() or [""])[0]
            raise ModelError(f"{self.variable}={self.name}: the factory {self.factory} raised "
                             f"{type(exc).__name__}: {first} (args {self.args}, input_shape "
                             f"{tuple(input_shape)}, num_classes {num_classes}); fix the factory or its "
                             f"arguments") from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"{self.variable}={self.name}: the factory {self.factory} returned a "
                             f"{type(model).__name__}, not a torch.nn.Module")
        return model

    def record(self, input_shape, num_classes: int) -> dict:
        """The JSON-able model record stored in checkpoints."""
        return {"name": self.name, "factory": self.factory, "args": self.args,
                "input_shape": [int(s) for s in input_shape], "num_classes": int(num_classes)}


def resolve_model(name: str | None, args_json: str | None = None, *, kind: str | None = None,
                  variable: str = "HPCDISTILL_MODEL") -> ModelSpec:
    """The ModelSpec `HPCDISTILL_MODEL` (or `variable`) and its `*_ARGS` JSON name; `kind` checks a
    built-in preset against the dataset kind and picks the default when `name` is None."""
    args_variable = f"{variable}_ARGS"
    user_args = json_object(args_json, args_variable)
    try:
        check_json_value(user_args, args_variable)
    except ValueError as exc:
        raise ModelError(f"{args_variable}: {exc}") from None
    if name is None:
        if kind is None:
            raise ModelError(f"{variable}: no model named and no dataset kind to choose a default for")
        name = default_model(kind)
    if is_import_path(name):
        load_callable(name, variable)  # fails here, before MPI, when it does not import
        return ModelSpec(name, name, user_args, variable)
    if name not in MODELS:
        raise ModelError(f"{variable}={name!r}: unknown model; built-in models: {_names()}; or name your own "
                         "factory as package.module:callable")
    entry = MODELS[name]
    if kind is not None and entry.kind != kind:
        default_model(kind)  # validates kind
        raise ModelError(f"{variable}={name!r}: model {name!r} is for {entry.kind} data, not {kind}; "
                         f"valid {kind} models: {_names(kind)}")
    return ModelSpec(name, entry.factory, {**entry.args, **user_args}, variable)


def spec_from_record(record, *, factories: dict[str, str], where: str) -> tuple[ModelSpec, tuple, int]:
    """(spec, input_shape, num_classes) to rebuild a checkpoint's model record with a factory the job
    allows: `factories` maps an allowed factory path to the variable that named it; built-in
    factories are always allowed (they are hpcdistill's own code). ModelError with the reason."""
    if not isinstance(record, dict):
        raise ModelError(f"{where}: the model record is a {type(record).__name__}, not an object")
    need = {"name", "factory", "args", "input_shape", "num_classes"}
    if not need <= set(record):
        raise ModelError(f"{where}: the model record lacks {sorted(need - set(record))} (a file from "
                         "hpcdistill before 0.2, or not a model checkpoint)")
    factory, args = record["factory"], record["args"]
    if not isinstance(factory, str) or not (factory in BUILTIN_FACTORIES or factory in factories):
        allowed = sorted(factories) + ["built-in factories"]
        raise ModelError(f"{where}: built by factory {factory!r}, which this job does not name (it allows "
                         f"{', '.join(allowed)}); set HPCDISTILL_TEACHER_MODEL (or HPCDISTILL_MODEL) to it "
                         "if you trust that code")
    if not isinstance(args, dict):
        raise ModelError(f"{where}: the record's args are a {type(args).__name__}, not an object")
    try:
        check_json_value(args, "args")
    except ValueError as exc:
        raise ModelError(f"{where}: {exc}") from None
    shape, classes = record["input_shape"], record["num_classes"]
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                                      for s in shape) and math.prod(shape) <= MAX_INPUT_ELEMENTS):
        raise ModelError(f"{where}: bad input_shape {shape!r} in the model record")
    if not (isinstance(classes, int) and not isinstance(classes, bool) and 2 <= classes <= MAX_CLASSES):
        raise ModelError(f"{where}: bad num_classes {classes!r} in the model record (2..{MAX_CLASSES})")
    name = record["name"] if isinstance(record["name"], str) else factory
    return ModelSpec(name, factory, args, factories.get(factory, "HPCDISTILL_MODEL")), tuple(shape), classes


def build_from_record(record, *, factories: dict[str, str] | None = None, where: str = "model record") -> nn.Module:
    """The (freshly initialised) model a checkpoint's record describes; see spec_from_record."""
    spec, shape, classes = spec_from_record(record, factories=factories or {}, where=where)
    return spec.build(shape, classes)


def manifest(model: nn.Module) -> dict[str, list]:
    """{state_dict key: [shape, dtype]} of every tensor of the model (parameters and buffers)."""
    return state_manifest(model.state_dict())


def state_manifest(state: dict) -> dict[str, list]:
    """{key: [shape, dtype]} of a state_dict's tensors."""
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()}


def all_finite(model: nn.Module) -> bool:
    """No NaN/inf in the parameters (a diverged model)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def sized_manifest(spec: ModelSpec, input_shape, num_classes: int) -> dict[str, list]:
    """The manifest of spec's model, built on the meta device: no memory is allocated for weights, so
    a record asking for a 14 GB model costs nothing to look at."""
    try:
        return manifest(spec.build(input_shape, num_classes, device="meta"))
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{spec.variable}={spec.name}: cannot size the model on the meta device "
                         f"({type(exc).__name__}: {exc})") from None


def diff_manifests(have: dict, want: dict, have_name: str, want_name: str) -> str | None:
    """None when equal, else the first differences naming both sides."""
    problems = [f"{k} missing in {have_name}" for k in want if k not in have]
    problems += [f"{k} in {have_name} only" for k in have if k not in want]
    problems += [f"{k}: {have_name} {tuple(have[k][0])} {have[k][1]}, {want_name} {tuple(want[k][0])} {want[k][1]}"
                 for k in want if k in have and list(have[k]) != list(want[k])]
    if not problems:
        return None
    return "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")



def count_parameters(model: nn.Module) -> int:
    """Number of parameters (frozen teachers included: it measures the model's size)."""
    return sum(p.numel() for p in model.parameters())
