"""Generated model structures for inject, merge and unload.

Drawn: a chain of 1-4 blocks (Linear, a Linear under two names, a Linear whose weight
is tied to an earlier one, a block repeated under a second index, MultiheadAttention,
TransformerEncoderLayer, TransformerDecoderLayer), targets (all, by type, by name,
suffix or regex), the order, eval (no grad: torch's fused fast paths) or train mode.
Checked: the adapted model's output equals the merged and the unloaded model's, within
fp32 rounding; a weight that another module also holds is refused by merge and unload,
the model left untouched. Then random invalid inject arguments, on a fresh or an
already adapted model: each is refused and leaves the model exactly as it was.
"""
import copy
import math
import warnings

import pytest
import torch
from hypothesis import event, given, settings, strategies as st
from torch import nn

import lie_kernels as lk

from test_model_structures import assert_untouched, randomise, snapshot

D, HEADS, FF = 8, 2, 12
KINDS = ["linear", "alias", "tied", "repeat", "mha", "encoder_layer", "decoder_layer"]
TARGETS = [None, [nn.Linear], "linear1", ["linear1", "linear2"], "out_proj", r"blocks\.0",
           ["blocks.1", "b"], "a", [r"blocks\.[0-9]+", "out_proj"]]


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.Linear(D, D)
        self.a, self.b = shared, shared

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Net(nn.Module):
    def __init__(self, kinds):
        super().__init__()
        self.blocks, self.kinds, linears = nn.ModuleList(), [], []
        for kind in kinds:
            if kind == "repeat" and len(self.blocks):  # the same module, a second index
                block, kind = self.blocks[-1], self.kinds[-1]
            elif kind == "alias":
                block = Aliased()
            elif kind == "mha":
                block = nn.MultiheadAttention(D, HEADS, batch_first=True)
            elif kind == "encoder_layer":
                block = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
            elif kind == "decoder_layer":
                block = nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
            else:
                block = nn.Linear(D, D)
                if kind == "tied" and linears:
                    block.weight = linears[0].weight
                linears.append(block)
                kind = "linear"
            self.blocks.append(block)
            self.kinds.append(kind)

    def forward(self, x):
        for block, kind in zip(self.blocks, self.kinds):
            if kind == "mha":
                x = x + block(x, x, x, need_weights=False)[0]
            elif kind == "decoder_layer":
                x = block(x, x.flip(1))
            elif kind == "encoder_layer":
                x = block(x)
            else:
                x = torch.tanh(block(x))
        return x


def _tied(model) -> bool:
    """Does another module hold the weight of an unmerged Lie layer? (merge/unload refuse)"""
    holders = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                holders.setdefault(id(p), set()).add(id(mod))
    return any(len(holders[id(m.base.weight)]) > 1 for _, m in lk.nn.lie_layers(model))


def _inject(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "inject: .* share one weight Parameter")
        return lk.inject(model, *args, **kwargs)


def _run(model, x, train):
    model.train(train)
    with torch.set_grad_enabled(train):
        return model(x)


@settings(max_examples=2 * settings.default.max_examples)
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=4),
       targets=st.sampled_from(TARGETS), order=st.sampled_from([1, 2, None]),
       train=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_adapted_output_equals_merged_and_unloaded(kinds, targets, order, train, seed):
    torch.manual_seed(seed)
    model = Net(kinds)
    before = snapshot(model)
    try:
        _inject(model, targets, rank=2, order=order)
    except (TypeError, ValueError) as exc:  # they name nothing or a non-layer here
        assert "no module of Net matches" in str(exc) or "supported layers" in str(exc)
        assert_untouched(model, before)
        event("targets rejected")
        return
    randomise(model, std=0.15)
    x = torch.randn(2, 4, D)
    want = _run(model, x, train)
    for fold in (lk.merge, lk.unload):
        folded = copy.deepcopy(model)
        if _tied(folded):
            before = snapshot(folded)
            with pytest.raises(RuntimeError, match=r"share one weight Parameter \(tied"):
                fold(folded)
            assert_untouched(folded, before)
            event("tied weight: fold refused")
            continue
        got = _run(fold(folded), x, train)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        event(f"compared with {fold.__name__}")
        if fold is lk.unload:
            assert not list(lk.nn.lie_layers(folded))
            assert all(type(m) is not lk.nn.LieLinear for m in folded.modules())


BAD_ARGS = st.one_of(
    st.sampled_from([["no_such_module"], [nn.GRU], True, 3, ["a(b"], [object], [1.5],
                     "[z"]).map(lambda v: {"trainable": v}),
    st.sampled_from(["x[", 3.5, [nn.Embedding], [nn.LayerNorm], ["no_such_module"], [None],
                     True, ["*"]]).map(lambda v: {"target_modules": v}),
    st.sampled_from([0, -1, 1.5, True, "2", (2, 2, 2)]).map(lambda v: {"rank": v}),
    st.sampled_from([-1, 65, 1.5, "1", True]).map(lambda v: {"order": v}),
    st.sampled_from([math.inf, math.nan, 4e38, -1e39, "1"]).map(lambda v: {"scale": v}),
    st.sampled_from([math.inf, 1e40, "8"]).map(lambda v: {"alpha": v}),
    st.sampled_from(["cp", 3, "Tucker"]).map(lambda v: {"parametrization": v}),
    st.sampled_from(["gpu", 3, ""]).map(lambda v: {"backend": v}),
    st.sampled_from([{"alpha": 8.0, "scale": 1.0}, {"rank": 2, "r": 2}, {"rnak": 2},
                     {"Rank": 2}]),
)


@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=4),
       first=st.sampled_from([None, "linear1", r"blocks\.0", "out_proj"]),
       bad=BAD_ARGS, seed=st.integers(0, 2 ** 16))
def test_rejected_inject_leaves_the_model_untouched(kinds, first, bad, seed):
    torch.manual_seed(seed)
    model = Net(kinds)
    if first is not None:  # a second inject must be checked as thoroughly
        try:
            _inject(model, first, rank=2, trainable=[nn.Tanh])  # raises: no Tanh anywhere
        except ValueError:
            pass
        try:
            _inject(model, first, rank=2)
        except (TypeError, ValueError):
            pass  # nothing of that name here
    before = snapshot(model)
    with pytest.raises((TypeError, ValueError)):
        _inject(model, **bad)
    assert_untouched(model, before)
