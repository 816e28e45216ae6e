"""Communication layer: the topology of ranks and groups, and MPI one-sided windows."""
