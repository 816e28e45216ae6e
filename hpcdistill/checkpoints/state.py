"""Training state <-> (arrays, meta), the two halves of a checkpoint file.

Tensors become arrays (bit-exact); everything else that resuming needs (step, data position, the
architecture record, optimizer hyper-parameters, numpy/python RNG state) goes to JSON meta, so a
checkpoint never needs pickle. Key layout:

    model/<state_dict key>               every model tensor (parameters and buffers)
    optimizer/state/<param idx>/<name>   every optimizer state tensor (momentum, exp_avg, step ...)
    rng/torch                            torch CPU generator state (uint8)
    extra/<name>                         caller's arrays (e.g. DC-ASGD mean-square buffers)
    meta: step, data_state, arch (the model record), optimizer {param_groups, scalars},
          rng {numpy, python}, manifest {key: [shape, dtype]} of every array, + caller's
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .h5io import CheckpointError, layout_dtype, to_tensor

_RESERVED = ("step", "data_state", "arch", "optimizer", "rng", "manifest")
_JSON_SCALARS = (bool, int, float, str, type(None))


def _snapshot(t: torch.Tensor) -> torch.Tensor:
    # A copy: the caller keeps training while (or before) the checkpoint is written.
    return t.detach().to("cpu", copy=True)


def capture(model, optimizer=None, *, step: int, data_state: dict | None = None, arch: dict | None = None,
            extra: dict | None = None, meta: dict | None = None, rng: bool = True) -> tuple[dict, dict]:
    """Snapshot model, optimizer, RNGs and extra arrays as (arrays, meta) for write_h5."""
    clash = set(_RESERVED) & set(meta or {})
    if clash:
        raise ValueError(f"meta keys {sorted(clash)} are reserved by capture()")
    arrays = {f"model/{k}": _snapshot(v) for k, v in model.state_dict().items()}
    out = {**(meta or {}), "step": int(step), "data_state": data_state, "arch": arch}
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars = {}
        for idx, pstate in sd["state"].items():
            for name, value in pstate.items():
                if isinstance(value, torch.Tensor):
                    arrays[f"optimizer/state/{idx}/{name}"] = _snapshot(value)
                elif isinstance(value, _JSON_SCALARS):
                    scalars.setdefault(str(idx), {})[name] = value
                else:
                    raise TypeError(f"optimizer state {idx}/{name} is a {type(value).__name__}; "
                                    f"only tensors and JSON scalars can be checkpointed")
        out["optimizer"] = {"param_groups": sd["param_groups"], "scalars": scalars,
                            "state_keys": sorted(str(i) for i in sd["state"])}
    if rng:
        arrays["rng/torch"] = torch.get_rng_state()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        version, mt, gauss_next = random.getstate()
        out["rng"] = {"numpy": [name, keys.tolist(), pos, has_gauss, cached],
                      "python": [version, list(mt), gauss_next]}
    for name, value in (extra or {}).items():
        arrays[f"extra/{name}"] = _snapshot(value) if isinstance(value, torch.Tensor) else np.array(value)
    out["manifest"] = {k: [list(v.shape), _dtype_name(v)] for k, v in arrays.items()}
    return arrays, out


def _dtype_name(value) -> str:
    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch.")
    return layout_dtype(np.asarray(value).dtype, None)


def model_part(entries: dict) -> dict:
    """The model/... entries of a checkpoint's arrays or layout, keyed as in the model's state_dict."""
    return {k.removeprefix("model/"): v for k, v in entries.items() if k.startswith("model/")}


def model_arrays(arrays: dict) -> dict[str, torch.Tensor]:
    """The model/... part of a checkpoint as a state_dict."""
    return {k: to_tensor(v) for k, v in model_part(arrays).items()}


def _check_model(sd: dict, model) -> None:
    want = model.state_dict()
    problems = [f"missing {k}" for k in want if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in want]
    problems += [f"{k}: checkpoint {tuple(sd[k].shape)} {sd[k].dtype}, model {tuple(v.shape)} {v.dtype}"
                 for k, v in want.items() if k in sd and (sd[k].shape != v.shape or sd[k].dtype != v.dtype)]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(None, f"checkpoint does not fit the model: {shown}")


def _optimizer_state(arrays: dict, saved: dict, optimizer) -> dict:
    state = {int(i): dict(saved["scalars"].get(i, {})) for i in saved["state_keys"]}
    for key, value in arrays.items():
        if key.startswith("optimizer/state/"):
            idx, name = key.removeprefix("optimizer/state/").split("/", 1)
            state[int(idx)][name] = to_tensor(value)
    groups = []
    for saved_group, live_group in zip(saved["param_groups"], optimizer.param_groups):
        # JSON turned tuples (Adam's betas) into lists; give them back the optimizer's own type.
        groups.append({k: tuple(v) if isinstance(live_group.get(k), tuple) and isinstance(v, list) else v
                       for k, v in saved_group.items()})
    groups += saved["param_groups"][len(groups):]  # a count mismatch is left for torch to report
    return {"state": state, "param_groups": groups}


def restore(arrays: dict, meta: dict, model, optimizer=None, *, rng: bool = True) -> dict:
    """Load a captured state into `model` (and `optimizer`, RNGs); returns meta (step, data_state, arch ...).

    Raises CheckpointError when the checkpoint does not fit: missing/unexpected keys, other shapes or
    dtypes, no optimizer or RNG state although asked for.
    """
    sd = model_arrays(arrays)
    _check_model(sd, model)
    if optimizer is not None and "optimizer" not in meta:
        raise CheckpointError(None, "checkpoint has no optimizer state")
    if rng and ("rng" not in meta or "rng/torch" not in arrays):
        raise CheckpointError(None, "checkpoint has no RNG state")
    model.load_state_dict(sd, strict=True)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(_optimizer_state(arrays, meta["optimizer"], optimizer))
        except (ValueError, KeyError) as e:
            raise CheckpointError(None, f"optimizer state does not fit the optimizer: {e}") from None
    if rng:
        torch.set_rng_state(to_tensor(arrays["rng/torch"]).clone())
        name, keys, pos, has_gauss, cached = meta["rng"]["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        version, mt, gauss_next = meta["rng"]["python"]
        random.setstate((version, tuple(mt), gauss_next))
    return meta
