"""Cases shared out across ranks by voxel count (prediction under torchrun, whole-volume validation)."""

from __future__ import annotations

import pytest

from iunet3d.infer.sharding import shard_cases


def test_every_case_goes_to_exactly_one_rank_and_the_voxels_are_balanced():
    voxels = {"a": 100, "b": 90, "c": 50, "d": 45, "e": 10, "f": 5}
    shards = shard_cases(voxels, 3)
    assert sorted(name for shard in shards for name in shard) == sorted(voxels)
    loads = [sum(voxels[name] for name in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(voxels.values()) // 2  # round-robin would give 150 vs 60
    assert all(shard == sorted(shard, key=list(voxels).index) for shard in shards)  # input order kept
    assert shards == shard_cases(dict(voxels), 3)  # every rank computes the same split


def test_fewer_cases_than_ranks_leave_ranks_without_cases():
    assert shard_cases({"a": 3, "b": 5}, 4) == [["b"], ["a"], [], []]
    assert shard_cases({"a": 1, "b": 1, "c": 1, "d": 1}, 2) == [["a", "c"], ["b", "d"]]
    with pytest.raises(ValueError, match="world_size"):
        shard_cases({"a": 1}, 0)
