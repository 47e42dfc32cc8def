"""Channel and head GradualMagnitudePruning under FSDP2 (``fully_shard``, two CPU ranks, gloo): each
rank's blocks of the masks (weights, biases, BatchNorm channels) are those a single process selects."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from compress_callbacks import CompressionManager, GradualMagnitudePruning
from compress_callbacks.pruning.sharded import row_range


class ConvNet(nn.Module):
    """7 channels (blocks of 4 and 3 rows) meeting at a residual add, BatchNorms, 9 hidden units."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 7, 3, padding=1), nn.BatchNorm2d(7)
        self.conv, self.bn = nn.Conv2d(7, 7, 3, padding=1, bias=False), nn.BatchNorm2d(7)
        self.fc1, self.fc2 = nn.Linear(7, 9), nn.Linear(9, 3)
        with torch.no_grad():  # BatchNorm channels that differ, so that their masks matter
            for bn in (self.bn0, self.bn):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn(self.conv(x)) + x)
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))

    def shard(self, fully_shard):
        for layer in (self.stem, self.conv, self.bn, self.fc1):  # bn0 and fc2 stay with the root
            fully_shard(layer)
        fully_shard(self)

    @staticmethod
    def example(generator):
        return torch.randn(4, 3, 6, 6, generator=generator)


class Attention(nn.Module):
    """Three heads of 4 (12 rows: the middle head lies across the two ranks' blocks) and an FFN."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(10, 12), nn.Linear(10, 12), nn.Linear(10, 12), nn.Linear(12, 10)
        self.up, self.down = nn.Linear(10, 11), nn.Linear(11, 10)

    def forward(self, x):
        def split(t):
            return t.view(*x.shape[:2], 3, 4).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.o(out.transpose(1, 2).reshape(*x.shape[:2], 12))
        return x + self.down(torch.relu(self.up(x)))

    def shard(self, fully_shard):
        for layer in (self.q, self.k, self.v, self.o, self.up, self.down):
            fully_shard(layer)
        fully_shard(self)

    @staticmethod
    def example(generator):
        return torch.randn(4, 5, 10, generator=generator)


def _gathered(tensor):
    return tensor.detach().full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()


def _train(runs, batches):
    for x in batches:
        for model, optimizer in runs:
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()


def _assert_same_masks(sharded_gmp, reference_gmp, what):
    state, expected = sharded_gmp.state_dict(), reference_gmp.state_dict()
    for name, mask, want in zip(state["names"], state["masks"], expected["masks"]):
        assert (mask is None) == (want is None) and (mask is None or torch.equal(mask, want)), f"{what}: {name}"
    assert state["owned_masks"].keys() == expected["owned_masks"].keys(), what
    for name, want in expected["owned_masks"].items():
        assert torch.equal(state["owned_masks"][name], want), f"{what}: {name}"
    return state


def _structured_fsdp2_worker(path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from compress_callbacks import _dist as D

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    for make, granularity, scope, target in ((ConvNet, "channel", "layer", 0.6), (ConvNet, "channel", "global", 0.5),
                                             (Attention, "head", "layer", 0.34), (Attention, "head", "global", 0.3)):
        what = f"{make.__name__}/{granularity}/{scope}"
        torch.manual_seed(0)
        reference = make().train()
        with torch.no_grad():  # an exact zero in the second rank's block only: attach keeps it, on every rank alike
            (reference.fc1 if make is ConvNet else reference.up).weight[-1, 0] = 0.0
        model = copy.deepcopy(reference)
        model.shard(fully_shard)
        assert all(D.is_sharded(p) for p in model.parameters())
        kwargs = dict(start_step=0, end_step=4, update_every=2, scope=scope, granularity=granularity,
                      initial_sparsity=0.2)  # the first selection waits for the first batch
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
        sharded_gmp, reference_gmp = GradualMagnitudePruning(target, **kwargs), GradualMagnitudePruning(target, **kwargs)
        manager = CompressionManager(sharded_gmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers that stay per-row / dense are named, on rank 0 only
            manager.attach(model, optimizer)
            reference_manager = CompressionManager(reference_gmp)
            reference_manager.attach(reference, reference_optimizer)
            g = torch.Generator().manual_seed(1)  # the same batches on both ranks: the averaged gradient is the reference's
            batches = [make.example(g) for _ in range(6)]
            _train([(model, optimizer), (reference, reference_optimizer)], batches[:3])
        # mid-schedule (after the updates at steps 0 and 2): resume both from their states
        state = _assert_same_masks(sharded_gmp, reference_gmp, what + " at step 3")
        assert state["owned_masks"] and any(not m.all() for m in state["owned_masks"].values()), what
        for gmp in (sharded_gmp, reference_gmp):
            for name, param in gmp.weights.items():
                assert gmp.masks[name].shape == D.local(param).shape
        resumed_states = (manager.state_dict(), reference_manager.state_dict())
        manager.finalize(model)
        reference_manager.finalize(reference)
        sharded_gmp, reference_gmp = GradualMagnitudePruning(target, **kwargs), GradualMagnitudePruning(target, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for gmp, net, opt, saved in ((sharded_gmp, model, optimizer, resumed_states[0]),
                                         (reference_gmp, reference, reference_optimizer, resumed_states[1])):
                resumed = CompressionManager(gmp)
                resumed.load_state_dict(saved)
                resumed.attach(net, opt)
            assert all((a is None and b is None) or torch.equal(a, b)
                       for a, b in zip(sharded_gmp.state_dict()["masks"], state["masks"])), what
            _train([(model, optimizer), (reference, reference_optimizer)], batches[3:])  # the update at step 4 traces again
        state = _assert_same_masks(sharded_gmp, reference_gmp, what + " after resuming")
        assert sharded_gmp.layer_sparsities() == reference_gmp.layer_sparsities(), what
        assert abs(sharded_gmp.overall_sparsity() - reference_gmp.overall_sparsity()) < 1e-12
        params, reference_params = dict(model.named_parameters()), dict(reference.named_parameters())
        for name, mask in zip(state["names"], state["masks"]):
            whole = _gathered(params[f"{name}.weight"])
            assert mask is None or torch.all(whole[~mask] == 0), name
            assert torch.allclose(whole, reference_params[f"{name}.weight"].detach(), atol=1e-6), name
        for name, mask in state["owned_masks"].items():
            assert torch.all(_gathered(params[name])[~mask] == 0), name
            assert row_range(params[name]) != (0, params[name].shape[0]), name  # a block, not the whole tensor
        if granularity == "head":  # whole heads: each 4-row block of q, k, v pruned together, the same in all three
            gone = [(state["masks"][state["names"].index(n)].view(3, -1) == 0).all(1) for n in ("q", "k", "v")]
            assert gone[0].any() and torch.equal(gone[0], gone[1]) and torch.equal(gone[0], gone[2]), what
    with open(f"{path}/rank{dist.get_rank()}.txt", "w") as f:
        f.write("ok")


def test_fsdp2_channel_and_head_masks_match_a_single_process(tmp_path, launch_two_processes):
    launch_two_processes(_structured_fsdp2_worker, tmp_path)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["ok", "ok"]


def test_row_range_of_a_plain_tensor_is_every_row():
    assert row_range(torch.zeros(7, 2)) == (0, 7)
    assert row_range(torch.zeros(())) == (0, 1)


@pytest.mark.parametrize("rows", [7, 12, 1])
def test_row_range_matches_fsdp2_blocks(rows):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from compress_callbacks import _dist as D

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        layer = nn.Linear(3, rows)
        fully_shard(layer)
        assert D.is_sharded(layer.weight) and row_range(layer.weight) == (0, rows) == row_range(layer.bias)
    finally:
        dist.destroy_process_group()
