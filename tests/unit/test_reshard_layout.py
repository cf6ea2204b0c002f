"""The layout maths of engines/reshard.py without processes: ZeRO-3 flat partitions built by hand the way
DeepSpeed writes them, re-split onto another world size, compared element by element.

DeepSpeed's ZeRO-3 layout (partition_parameters.py ``_partition_param``, utils/zero_to_fp32.py
``zero3_partitioned_param_info`` / ``GatheredTensor``): every parameter p of n elements is cut into W
partitions of s = ceil(n / W); rank r holds ``full(p)[r*s : r*s + s]``, the last ranks padded up to s. A
rank's flat fp32 partition of a sub-group (and Adam's exp_avg / exp_avg_sq of it) is the concatenation of its
partitions of that sub-group's params, in ``param_shapes`` order; the sub-group flats of a rank follow each
other. DeepSpeed allocates partitions with ``torch.empty``, so the padding of a saved checkpoint is garbage:
here it is NaN, which a read of the padding (or an off-by-one offset) cannot hide. The re-split flats must pad
with exact zeros, like a fresh ``zero_`` partition. Odd sizes (7, 5x3, 13) and params smaller than the world
(1, 2 elements: whole ranks of padding) run every padding branch; values are distinct, so every comparison is
bit-exact (``torch.equal``) and any shifted element shows.

The same re-split on real engines (2 -> 3 -> 2 ranks) is tests/distributed/test_reshard.py.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fastardiff_ds.engines.reshard import (_load_engine_counters, _load_frozen, _new_flat, _OldLayout,
                                           _state_dict, optim_files)

SHAPES = {"w": torch.Size([5, 3]), "a": torch.Size([7]), "c": torch.Size([13]), "g": torch.Size([1]),
          "e": torch.Size([2])}
GARBAGE = float("nan")  # DeepSpeed's padding: uninitialised memory


def full_values(seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinct, non-zero values per parameter (flattened), so a shifted or padded element shows."""
    g = torch.Generator().manual_seed(seed)
    out, base = {}, 1.0
    for name, shape in SHAPES.items():
        n = shape.numel()
        out[name] = base + torch.arange(n, dtype=torch.float32) + 0.25 * torch.rand(n, generator=g)
        base += 100.0
    return out


class FakeParam:
    """What _new_flat reads of a ZeRO-3 param: its full numel (``ds_numel``); hashed by identity."""

    def __init__(self, numel: int):
        self.ds_numel = numel


def partition(full: torch.Tensor, rank: int, world: int, pad: float) -> torch.Tensor:
    """Rank ``rank``'s DeepSpeed partition of one flattened param: s = ceil(n / W) elements, padded with ``pad``."""
    n = full.numel()
    s = math.ceil(n / world)
    piece = full[min(rank * s, n): min(rank * s + s, n)]
    return torch.cat([piece, torch.full((s - piece.numel(),), pad)])


def ds_flats(fulls: dict, world: int, sub_groups: list[list[str]], pad: float = GARBAGE) -> list[list[torch.Tensor]]:
    """Per rank, per sub-group: the flat fp32 partition DeepSpeed saves in ``fp32_flat_groups``."""
    return [[torch.cat([partition(fulls[n], r, world, pad) for n in group]) for group in sub_groups]
            for r in range(world)]


def gathered_by_deepspeed(flats: list[list[torch.Tensor]], name: str) -> torch.Tensor:
    """DeepSpeed's own reconstruction (zero_to_fp32.GatheredTensor) of one param: the oracle for _OldLayout."""
    import numpy as np
    from deepspeed.utils.zero_to_fp32 import GatheredTensor, zero3_partitioned_param_info

    world, offset = len(flats), 0
    for n, shape in SHAPES.items():
        s, _ = zero3_partitioned_param_info(shape.numel(), world)
        if n == name:
            bounds = [0] + list(np.cumsum([t.numel() for t in flats[0]]))
            return GatheredTensor(flats, bounds, offset, s, SHAPES[name]).contiguous().reshape(-1)
        offset += s
    raise KeyError(name)


SPLITS = {  # sub-groups hold whole params; one flat, or several of uneven sizes
    "one": [list(SHAPES)],
    "three": [["w"], ["a", "c"], ["g", "e"]],
}


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("world", [1, 2, 3])
def test_old_layout_reconstructs_every_param_bit_exactly(world, split):
    fulls = full_values()
    flats = ds_flats(fulls, world, SPLITS[split])
    layout = _OldLayout(flats, SHAPES)
    for name, shape in SHAPES.items():
        n = shape.numel()
        got = layout.read(name, n, 0, n)
        assert got.dtype == torch.float32 and torch.equal(got, fulls[name]), name
        assert torch.equal(got, gathered_by_deepspeed(flats, name)), name
        for a in range(n):  # every sub-range, across rank boundaries: no padding (NaN) read, nothing shifted
            for b in range(a + 1, n + 1):
                assert torch.equal(layout.read(name, n, a, b), fulls[name][a:b]), (name, a, b)


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("old,new", [(1, 3), (2, 3), (3, 2), (3, 1), (2, 1), (1, 2)])
def test_new_flat_is_deepspeeds_layout_on_the_new_world_with_zero_padding(old, new, split):
    fulls = full_values()
    layout = _OldLayout(ds_flats(fulls, old, SPLITS[split]), SHAPES)
    params = {name: FakeParam(shape.numel()) for name, shape in SHAPES.items()}
    names = {p: name for name, p in params.items()}
    want = ds_flats(fulls, new, SPLITS[split], pad=0.0)
    pads = 0
    for rank in range(new):
        for k, group in enumerate(SPLITS[split]):
            got = _new_flat(layout, [params[n] for n in group], names, rank, new)
            assert torch.equal(got, want[rank][k]), (rank, group)
            pos = 0  # the padding, located independently: exact zeros, not garbage, not ones
            for n in group:
                numel, s = SHAPES[n].numel(), math.ceil(SHAPES[n].numel() / new)
                real = max(0, min(s, numel - rank * s))
                assert torch.equal(got[pos: pos + real], fulls[n][rank * s: rank * s + real]), (rank, n)
                assert torch.equal(got[pos + real: pos + s], torch.zeros(s - real)), (rank, n)
                pads += s - real
                pos += s
            assert pos == got.numel()
    assert pads == sum(math.ceil(s.numel() / new) * new - s.numel() for s in SHAPES.values())
    assert (pads > 0) == (new > 1)  # one rank: no padding; 2 or 3 ranks: every odd size is padded


def test_chain_2_to_3_to_2_returns_the_original_partitions():
    """Re-split flats are a valid checkpoint in their turn: 2 -> 3 -> 2 gives back rank 0/1's real elements,
    and the re-split padding is zeros (the saved 2-rank padding was garbage)."""
    fulls, groups = full_values(1), SPLITS["three"]
    params = {name: FakeParam(shape.numel()) for name, shape in SHAPES.items()}
    names = {p: name for name, p in params.items()}
    flats = ds_flats(fulls, 2, groups)
    for world in (3, 2):
        layout = _OldLayout(flats, SHAPES)
        flats = [[_new_flat(layout, [params[n] for n in g], names, r, world) for g in groups] for r in range(world)]
    for got, want in zip(flats, ds_flats(fulls, 2, groups, pad=0.0)):
        assert all(torch.equal(x, y) for x, y in zip(got, want))
    layout = _OldLayout(flats, SHAPES)
    for name, shape in SHAPES.items():
        assert torch.equal(layout.read(name, shape.numel(), 0, shape.numel()), fulls[name])


def test_the_comparison_rejects_ones_padding_and_an_off_by_one_offset():
    """The assertions above compare values, not shapes: a flat padded with ones, or a layout whose offset is
    one element off, has the right shape and fails them."""
    fulls = full_values()
    params = {name: FakeParam(shape.numel()) for name, shape in SHAPES.items()}
    names = {p: name for name, p in params.items()}
    layout = _OldLayout(ds_flats(fulls, 2, SPLITS["one"]), SHAPES)
    got = _new_flat(layout, list(params.values()), names, 2, 3)  # rank 2 of 3: padding in every param
    ones = ds_flats(fulls, 3, SPLITS["one"], pad=1.0)[2][0]
    assert got.shape == ones.shape and not torch.equal(got, ones)
    layout.offset["c"] += 1  # off by one: the same number of elements, the wrong ones (or the garbage padding)
    shifted = layout.read("c", 13, 0, 13)
    assert shifted.shape == fulls["c"].shape and not torch.equal(shifted, fulls["c"])


def test_old_layout_rejects_flats_shorter_than_the_saved_shapes():
    flats = ds_flats(full_values(), 2, SPLITS["one"])
    short = [[t[:-1]] for [t] in flats]
    with pytest.raises(ValueError, match="does not match its own metadata"):
        _OldLayout(short, SHAPES)


def test_optim_files_in_rank_order_and_missing_rank(tmp_path):
    for r in (1, 0, 2):
        (tmp_path / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert [p.name for p in optim_files(tmp_path, 3)] == [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                                          for r in range(3)]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        optim_files(tmp_path, 4)


def _frozen_setup(old_world: int):
    """A module with three frozen params (one partitioned ZeRO-3 param per odd size, one that is not
    partitioned) and a buffer; the model-state files ``old_world`` ranks would have written."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.a = torch.nn.Parameter(torch.empty(7), requires_grad=False)
    module.w = torch.nn.Parameter(torch.empty(5, 3), requires_grad=False)
    module.plain = torch.nn.Parameter(torch.full((2, 3), -1.0), requires_grad=False)  # no ds_tensor
    module.register_buffer("buf", torch.zeros(5))
    saved = {"a": torch.arange(1.0, 8.0), "w": torch.arange(11.0, 26.0).view(5, 3),
             "plain": torch.arange(31.0, 37.0).view(2, 3)}
    model = []
    for r in range(old_world):
        frags = {n: partition(saved[n].reshape(-1), r, old_world, GARBAGE) for n in ("a", "w")}
        frags["plain"] = saved["plain"].clone()  # DeepSpeed saves an unpartitioned param whole, from every rank
        model.append({"frozen_param_shapes": {n: t.shape for n, t in saved.items()},
                      "frozen_param_fragments": frags, "module": {"buf": torch.arange(41.0, 46.0)}})
    names = {p: n for n, p in module.named_parameters()}
    return module, model, names, saved


@pytest.mark.parametrize("old,new", [(1, 3), (2, 3), (3, 2)])
def test_load_frozen_resplits_partitions_with_zero_padding_and_copies_the_rest(old, new):
    for rank in range(new):
        module, model, names, saved = _frozen_setup(old)
        for n in ("a", "w"):  # this rank's current partition: garbage the load must overwrite entirely
            getattr(module, n).ds_tensor = torch.full((math.ceil(saved[n].numel() / new),), GARBAGE)
        _load_frozen(SimpleNamespace(module=module), model, names, rank, new)
        for n in ("a", "w"):
            want = partition(saved[n].reshape(-1), rank, new, 0.0)
            assert torch.equal(getattr(module, n).ds_tensor, want), (old, new, rank, n)
        assert torch.equal(module.plain.data, saved["plain"])
        assert torch.equal(module.buf, torch.arange(41.0, 46.0))


class _Sched:
    def __init__(self):
        self.loaded = None

    def load_state_dict(self, sd):
        self.loaded = sd


@pytest.mark.parametrize("load_optimizer", [True, False])
def test_load_engine_counters(load_optimizer):
    ds = SimpleNamespace(lr_scheduler=_Sched(), global_steps=0, global_samples=0, skipped_steps=0,
                         train_batch_size=lambda: 6)
    _load_engine_counters(ds, {"lr_scheduler": {"last_epoch": 5}, "global_steps": 5, "skipped_steps": 1},
                          load_optimizer)
    assert (ds.global_steps, ds.skipped_steps, ds.global_samples) == (5, 1, 30)  # samples: steps x batch
    assert ds.lr_scheduler.loaded == ({"last_epoch": 5} if load_optimizer else None)
    _load_engine_counters(ds, {"lr_scheduler": None, "global_steps": 7, "global_samples": 40,
                               "skipped_steps": 0}, load_optimizer)
    assert (ds.global_steps, ds.global_samples) == (7, 40)


def test_state_dict_maps_sub_groups_to_param_groups_and_keeps_adam_step():
    """Three new sub-groups (two in param group 0, one in group 1): each gets its re-split moments and the
    saved Adam step; the param groups keep their hyper-parameters and list the new sub-group ids."""
    step = torch.tensor(4.0)
    old0 = {"loss_scaler": "ls", "fp32_flat_groups": ["old"],
            "optimizer_state_dict": {"state": {0: {"step": step, "exp_avg": "old"}},
                                     "param_groups": [{"lr": 0.1, "weight_decay": 0.1, "params": [0]},
                                                      {"lr": 0.1, "weight_decay": 0.0, "params": [1]}]}}
    new = {"fp32": ["f0", "f1", "f2"], "exp_avg": ["m0", "m1", "m2"]}
    opt = SimpleNamespace(fp16_groups=[[], [], []], sub_group_to_group_id={0: 0, 1: 0, 2: 1})
    sd = _state_dict(old0, new, opt)
    assert sd["fp32_flat_groups"] == ["f0", "f1", "f2"] and sd["loss_scaler"] == "ls"
    groups = sd["optimizer_state_dict"]["param_groups"]
    assert [g["params"] for g in groups] == [[0, 1], [2]] and [g["weight_decay"] for g in groups] == [0.1, 0.0]
    state = sd["optimizer_state_dict"]["state"]
    assert sorted(state) == [0, 1, 2] and [state[k]["exp_avg"] for k in range(3)] == ["m0", "m1", "m2"]
    assert all(torch.equal(state[k]["step"], step) and state[k]["step"] is not step for k in range(3))
    before_step = {**old0, "optimizer_state_dict": {**old0["optimizer_state_dict"], "state": {}}}
    assert _state_dict(before_step, {"fp32": new["fp32"]}, opt)["optimizer_state_dict"]["state"] == {}
