"""HDF5 checkpoints: the file format (h5io), training state capture/restore (state), rotation (manager)."""

from .h5io import CheckpointError, read_h5, read_meta, to_tensor, verify_h5, write_h5
from .manager import CheckpointManager, numbered_files
from .state import capture, model_arrays, model_part, restore

__all__ = ["CheckpointError", "CheckpointManager", "capture", "model_arrays", "model_part", "numbered_files",
           "read_h5", "read_meta", "restore", "to_tensor", "verify_h5", "write_h5"]
