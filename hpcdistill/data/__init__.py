"""Datasets as HDF5 split files: the layout, the built-in preparers and each rank's shard reader."""

from hpcdistill.data.builtin import BUILTIN_DATASETS, import_arrays, prepare
from hpcdistill.data.format import DataError, DatasetInfo, dataset_info
from hpcdistill.data.shard import ShardReader, eval_batches

__all__ = ["BUILTIN_DATASETS", "DataError", "DatasetInfo", "ShardReader", "dataset_info", "eval_batches",
           "import_arrays", "prepare"]
