"""Datasets: the HDF5 layout and its preparers, the dataset registry (sources) and each rank's loader.

The loader and the sources need torch; `data prepare` / `data import` do not, so those two are
imported on first use (a CLI call that imports torch pays ~1 s for nothing).
"""

from hpcdistill.data.builtin import BUILTIN_DATASETS, dataset_info, import_arrays, prepare
from hpcdistill.data.format import DataError, DatasetInfo

_LAZY = {"ShardSampler": "loader", "TrainStream": "loader", "eval_batches": "loader",
         "DataSource": "sources", "open_source": "sources"}

__all__ = ["BUILTIN_DATASETS", "DataError", "DataSource", "DatasetInfo", "ShardSampler", "TrainStream",
           "dataset_info", "eval_batches", "import_arrays", "open_source", "prepare"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"hpcdistill.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'hpcdistill.data' has no attribute {name!r}")
