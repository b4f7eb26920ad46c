"""The data-parallel hooks of the training loop without a cluster: a rank's share of a step, the
gradient sum over ranks (a rank with no micro-batch adds zeros), the metric sums, and
``TorchDistributed`` over a real one-rank gloo group (the Ray test runs two ranks)."""

import pytest
import torch

from lmforge.training.distributed import (MetricSums, TorchDistributed, my_share, sum_over_ranks,
                                          sync_grads, world_size, writes_files)


class PeerOf0:
    """Rank 0 of 2 whose peer's contributions are given: the sums it would receive."""

    rank, world_size = 0, 2

    def __init__(self, peer_flat, peer_values):
        self.peer_flat, self.peer_values = peer_flat, peer_values

    def all_reduce(self, tensor):
        tensor += self.peer_flat

    def sum_dicts(self, values):
        names = set(values) | set(self.peer_values)
        return {n: values.get(n, 0.0) + self.peer_values.get(n, 0.0) for n in names}


def test_shares_interleave_and_only_rank_0_writes():
    class Rank1(PeerOf0):
        rank = 1
    assert my_share(list(range(5)), Rank1(None, {})) == [1, 3]
    assert list(my_share(range(5), PeerOf0(None, {}))) == [0, 2, 4]
    assert my_share([7, 8], None) == [7, 8] and world_size(None) == 1
    assert writes_files(None) and writes_files(PeerOf0(None, {}))
    assert not writes_files(Rank1(None, {}))


def test_gradients_are_summed_over_ranks_in_one_flat_all_reduce():
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.ones(2, 2)  # b: no micro-batch touched it here, its grad is None
    sync_grads(PeerOf0(torch.arange(7.0), {}), [a, b])
    torch.testing.assert_close(a.grad, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(b.grad, torch.tensor([4.0, 5.0, 6.0]))
    sync_grads(None, [a, b])  # alone: untouched
    torch.testing.assert_close(b.grad, torch.tensor([4.0, 5.0, 6.0]))


def test_metric_sums_add_over_ranks_a_missing_name_counting_0():
    sums = MetricSums()
    sums.add({"rewards/chosen": 1.0})
    sums.add({"rewards/chosen": 2.0})
    total = sum_over_ranks(PeerOf0(None, {"rewards/chosen": 1.0, "x": 2.0}), sums)
    assert total == {"rewards/chosen": 4.0, "x": 2.0}
    assert MetricSums(total).means(2) == {"rewards/chosen": 2.0, "x": 1.0}
    assert sum_over_ranks(None, sums) == {"rewards/chosen": 3.0}


def test_torch_distributed_on_a_one_rank_gloo_group(tmp_path):
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                                         rank=0, world_size=1)
    try:
        group = TorchDistributed(0, 1)
        tensor = torch.tensor([1.0, 2.0])
        group.all_reduce(tensor)
        torch.testing.assert_close(tensor, torch.tensor([1.0, 2.0]))
        assert group.sum_dicts({"a": 1.5}) == {"a": 1.5}
    finally:
        torch.distributed.destroy_process_group()
