"""Synchronous data parallelism inside a group: Horovod allreduce over the group's process set."""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from hpcdistill.models import all_finite


class SyncUpdater:
    """Gradients are averaged across the group by Horovod during backward; every rank steps alike.

    `comm` is the communicator of the ranks that run the training loop for this group; its rank 0
    is the group's speaker, checkpoint writer and exchange leader.
    """

    is_host = False

    def __init__(self, topo, model, optimizer):
        import horovod.torch as hvd

        self.comm = self.eval_comm = topo.group_comm  # evaluation and checkpoints are collective in it
        self.writes = self.comm.Get_rank() == 0
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

    def settle(self, model) -> None:
        """Make the group's replicas agree on their buffers (BatchNorm running statistics), which each
        rank updates from its own batches: they are averaged (collective in comm), before evaluation,
        checkpoints and publishing. Parameters need nothing: the allreduce keeps them equal."""
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        size = self.comm.Get_size()
        if not buffers or size == 1:
            return
        flat = torch.cat([b.detach().reshape(-1).to("cpu", torch.float64) for b in buffers]).numpy()
        self.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        flat /= size
        offset = 0
        with torch.no_grad():
            for b in buffers:
                b.copy_(torch.from_numpy(flat[offset:offset + b.numel()]).view_as(b))
                offset += b.numel()

    def current_model(self, model):
        """The weights to evaluate and publish: the local replica is the group's model."""
        return model

    def checkpoint_view(self, model) -> tuple:
        return model, {}

    def gather_rngs(self, rng: np.ndarray) -> np.ndarray | None:
        """Every rank's RNG state on the writer (collective): a resume restores each rank's stream."""
        rngs = np.empty((self.comm.Get_size(), rng.size), np.uint8) if self.writes else None
        self.comm.Gather(rng, rngs, root=0)
        return rngs

    def diverged(self, model) -> bool:
        """NaN/inf weights; every rank holds the same, so all of them stop at the same step."""
        return not all_finite(model)

    def saves(self, step: int, final: bool) -> bool:
        return True  # collective: every rank takes part, the writer writes

    def saves_after_finish(self, final: bool) -> bool:
        return False

    @staticmethod
    def pool(parts: list[dict]) -> dict:
        return {}

    def step_metrics(self) -> dict:
        return {}

    def agree(self, flag: bool) -> bool:
        """True on every rank of the group if any rank wants to stop (a signal reached it)."""
        return bool(self.comm.allreduce(int(flag), op=MPI.MAX))

    def load_extra_state(self, arrays: dict) -> None:
        pass

    def summary(self) -> dict:
        return {}

    def close(self) -> None:
        """Shut the group's Horovod down now, on every rank together (the loop calls this at the same
        point on each). Left to its exit handler, a rank whose peer had already exited waited in
        Horovod's shutdown negotiation; under srun --kill-on-bad-exit the peer's exit 75 then got it
        killed, and the job step ended 143 instead of 75 (tests/test_slurm.py, once in five runs)."""
        import horovod.torch as hvd

        hvd.shutdown()
