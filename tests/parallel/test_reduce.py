"""parallel/reduce.py: one rank exchanges nothing; several ranks reduce through the group."""

import torch.distributed as dist

from miles_fsdp.parallel.reduce import all_reduce_max, all_reduce_sum


def test_without_a_process_group_values_come_back():
    assert all_reduce_sum([1, 2.5]) == [1.0, 2.5] and all_reduce_max([3]) == [3.0]


def test_one_rank_skips_the_collective_and_several_ranks_call_it(monkeypatch):
    calls = []

    def all_reduce(t, op=None, group=None):
        calls.append((op, group))
        t.mul_(2)  # stands for the other rank's equal values

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    assert all_reduce_sum([1.0, 2.0], group="g") == [1.0, 2.0] and calls == []
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    assert all_reduce_sum([1.0, 2.0], group="g") == [2.0, 4.0]
    assert calls == [(dist.ReduceOp.SUM, "g")]
    assert all_reduce_max([1.0], group="g") == [2.0] and calls[-1] == (dist.ReduceOp.MAX, "g")
