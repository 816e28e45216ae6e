"""Code and arguments named by the job's settings: `package.module:callable` paths and JSON objects.

Users bring their own model and dataset factories by import path (as Lightning's `class_path` or
torchdistill's config do). Only the job's own settings name code; files read from the shared
filesystem never do (they carry arguments, which are data). Every failure here is a bad setting: the
message names the variable, the value and the fix, and the job exits 2 before MPI starts.
"""

from __future__ import annotations

import importlib
import json
import math
import re

from hpcdistill.config import ConfigError

IMPORT_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
                         r":[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*",
                         re.ASCII)


def is_import_path(text: str) -> bool:
    return ":" in text


def load_callable(path: str, variable: str):
    """The object `package.module:attr[.attr]` names; ConfigError naming `variable` otherwise."""
    if not IMPORT_PATH.fullmatch(path):
        raise ConfigError(f"{variable}={path!r}: not an import path; expected package.module:callable "
                          "(the module importable from PYTHONPATH or installed), or a built-in name")
    module_name, _, attrs = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any error while importing the user's module is theirs to fix
        first = (str(exc).splitlines() or [""])[0]
        raise ConfigError(f"{variable}={path!r}: module {module_name!r} does not import ({type(exc).__name__}: "
                          f"{first}); put its directory on PYTHONPATH (on every node) or install it") from None
    for attr in attrs.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(f"{variable}={path!r}: {module_name!r} has no attribute {attr!r}; check the name "
                              "after the colon")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(f"{variable}={path!r}: {type(obj).__name__} object is not callable; name a function "
                          "or class")
    return obj


def json_object(text: str | None, variable: str) -> dict:
    """A JSON object of keyword arguments (None or empty: {}); ConfigError naming `variable` otherwise."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        raise ConfigError(f"{variable}={text!r}: not valid JSON ({exc}); give a JSON object, e.g. "
                          "'{\"width\": 16}' (quote it in the shell)") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{variable}={text!r}: a JSON {type(value).__name__}, expected a JSON object of "
                          "keyword arguments, e.g. '{\"width\": 16}'")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def check_json_value(value, where: str) -> None:
    """Raise ValueError unless `value` is plain JSON data (finite numbers, strings, lists, objects)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: non-finite number {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a string")
            check_json_value(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_json_value(v, f"{where}[{i}]")
    elif not isinstance(value, (str, int, float, bool, type(None))):
        raise ValueError(f"{where}: {type(value).__name__} is not JSON data")
