"""Updaters: how a rank's gradients become weight updates (Horovod allreduce, or DC-ASGD over RMA)."""
