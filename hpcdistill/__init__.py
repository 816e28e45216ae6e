"""hpcdistill: sync data parallelism, codistillation, DC-ASGD and distillation on MPI clusters."""

__version__ = "0.2.0"
