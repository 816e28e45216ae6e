"""Datasets: the HDF5 layout and its preparers, the dataset registry (sources) and each rank's loader."""

from hpcdistill.data.builtin import BUILTIN_DATASETS, dataset_info, import_arrays, prepare
from hpcdistill.data.format import DataError, DatasetInfo
from hpcdistill.data.loader import ShardSampler, TrainStream, eval_batches
from hpcdistill.data.sources import DataSource, open_source

__all__ = ["BUILTIN_DATASETS", "DataError", "DataSource", "DatasetInfo", "ShardSampler", "TrainStream",
           "dataset_info", "eval_batches", "import_arrays", "open_source", "prepare"]
