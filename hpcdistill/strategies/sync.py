"""Synchronous data parallelism inside a group: Horovod allreduce over the group's process set."""

from __future__ import annotations

import time

from mpi4py import MPI


class SyncUpdater:
    """Gradients are averaged across the group by Horovod during backward; every rank steps alike.

    `comm` is the communicator of the ranks that run the training loop for this group; its rank 0
    is the group's speaker, checkpoint writer and exchange leader.
    """

    is_host = False
    synchronous = True  # checkpoints and evaluations are collective in `comm`

    def __init__(self, topo, model, optimizer):
        import horovod.torch as hvd

        self.comm = topo.group_comm
        self.optimizer = hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(), process_set=topo.process_set)
        self.wait_seconds = 0.0

    def step(self, model, compute_loss, lr: float) -> dict:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad()
        loss, parts = compute_loss()
        loss.backward()
        t = time.perf_counter()
        self.optimizer.step()  # waits for the allreduce of the last gradients
        self.wait_seconds += time.perf_counter() - t
        return parts

    def begin(self, model, step: int) -> int:
        """Nothing to do: every rank already holds the group's weights (broadcast on restore)."""
        return step

    def finish(self) -> None:
        """Nothing to wait for: the group's ranks end the loop at the same step."""

    def current_model(self, model):
        """The weights to evaluate, checkpoint and publish: the local replica is the group's model."""
        return model

    def step_metrics(self) -> dict:
        return {}

    def agree(self, flag: bool) -> bool:
        """True on every rank of the group if any rank wants to stop (a signal reached it)."""
        return bool(self.comm.allreduce(int(flag), op=MPI.MAX))

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, arrays: dict) -> None:
        pass

    def summary(self) -> dict:
        return {}

    def close(self) -> None:
        pass
