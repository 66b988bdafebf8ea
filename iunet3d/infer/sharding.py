"""Cases shared out across the ranks of a job so that each rank predicts about as many voxels."""

from __future__ import annotations

import heapq
from collections.abc import Mapping


def shard_cases(voxels: Mapping[str, int], world_size: int) -> list[list[str]]:
    """Case names per rank (rank order), balanced by voxel count.

    Largest case first to the least loaded rank (ties to the lower rank), so every rank computes the
    same assignment from the same sizes. Each rank's cases keep the order of ``voxels``. A rank gets no
    case when there are fewer cases than ranks.
    """
    if world_size < 1:
        raise ValueError(f"world_size: expected a positive integer, got {world_size}")
    order = {name: index for index, name in enumerate(voxels)}
    loads = [(0, rank) for rank in range(world_size)]
    shards: list[list[str]] = [[] for _ in range(world_size)]
    for name in sorted(voxels, key=lambda name: (-voxels[name], order[name])):
        load, rank = heapq.heappop(loads)
        shards[rank].append(name)
        heapq.heappush(loads, (load + voxels[name], rank))
    return [sorted(shard, key=order.__getitem__) for shard in shards]
