"""How a flat vector is cut into the parameter hosts' shards (pure: no MPI, unlike comm/rma.py)."""

from __future__ import annotations


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges cutting n elements into `parts` nearly equal shards (in order)."""
    if parts < 1:
        raise ValueError(f"need at least one shard, got {parts}")
    cuts = [n * i // parts for i in range(parts + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(parts)]
