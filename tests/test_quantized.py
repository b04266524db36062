"""Quantized base weights (bitsandbytes nf4/fp4/int8): the dequantization against
bitsandbytes' own, the fused op against a float64 reference of deq(W) ⊙ exp_K(s·Δ), Lie
layers over bitsandbytes layers, and the way back (unload refuses, dequantizes or
requantizes; merge refuses)."""
import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import lie_kernels as lk
from lie_kernels import quant
from lie_kernels.backends import get_backend, torch_backend
from lie_kernels.backends.base import row_slices
from lie_kernels.ops import layer as layer_ops
from lie_kernels.reference import lie_weight_lowrank_ref, lie_weight_ref

from helpers import rel_err

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402
from bitsandbytes.backends.utils import _get_4bit_code  # noqa: E402
from bitsandbytes.functional import (dequantize_4bit, dequantize_blockwise,  # noqa: E402
                                     int8_vectorwise_dequant)

ORDERS = [0, 1, 2, 4, None]


def params4bit(w, kind="nf4", blocksize=64, nested=True):
    return bnb.nn.Params4bit(w, requires_grad=False, quant_type=kind, blocksize=blocksize,
                             compress_statistics=nested).to("cpu")


def int8params(w):
    return bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to("cpu")


def _bnb_reference_4bit(p):
    """bitsandbytes' reference dequantization (its default, pure-PyTorch kernel)."""
    st = p.quant_state
    absmax = st.absmax
    if st.nested:
        absmax = dequantize_blockwise(st.absmax, st.state2) + st.offset
    return _dequantize_4bit_compute(p.data.reshape(-1), absmax.float(),
                                    _get_4bit_code(st.quant_type, "cpu"), st.blocksize,
                                    st.shape, torch.float32)


@pytest.mark.parametrize("shape", [(20, 64), (7, 33), (33, 130), (48, 256)])
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
def test_4bit_dequantization_is_bitsandbytes_own(shape, kind, nested, blocksize):
    """Bitwise bitsandbytes' reference dequantization for every quant type, blocksize and
    nested statistics, whole, one row and three rows at a time (odd numbers of elements
    included), through bitsandbytes' own op where a slice is whole blocks and through the
    code table;
    and bitwise its CPU kernel wherever that kernel agrees with its own quantization
    (rows a multiple of the blocksize: bitsandbytes 0.50.2's CPU kernel misreads blocks
    that straddle rows, e.g. 20x64 at blocksize 128)."""
    torch.manual_seed(blocksize)
    p = params4bit(torch.randn(*shape), kind, blocksize, nested)
    ref = _bnb_reference_4bit(p)
    native = quant.from_bnb(p)
    assert native._native_4bit is not None  # block-aligned slices go to bitsandbytes' op
    assert dataclasses.replace(native, from_bitsandbytes=False)._native_4bit is None
    gather = quant.from_bnb(p)
    gather.__dict__["_native_4bit"] = None  # the pure-PyTorch code table, everywhere
    for q in (native, gather):
        assert torch.equal(q.rows(0, shape[0]), ref)
        assert torch.equal(torch.cat([q.rows(r, 1) for r in range(shape[0])]), ref)
        assert torch.equal(torch.cat([q.rows(r, 3) for r in range(0, shape[0] - 2, 3)]),
                           ref[:shape[0] - shape[0] % 3])
    if shape[1] % blocksize == 0:
        assert torch.equal(q.dequantize(torch.float32), dequantize_4bit(p.data, p.quant_state))


def test_int8_dequantization_is_bitsandbytes_own():
    p = int8params(torch.randn(9, 17))
    q = quant.from_bnb(p)
    assert q.kind == "int8" and torch.equal(q.dequantize(), int8_vectorwise_dequant(p.data,
                                                                                      p.SCB))


def test_quantized_weight_checks_its_parts():
    p = params4bit(torch.randn(4, 8))
    q = quant.from_bnb(p)
    with pytest.raises(ValueError, match=r"kind must be one of"):
        quant.QuantizedWeight("nf3", q.data, q.scales, q.shape, torch.float32, 64, q.code)
    with pytest.raises(ValueError, match=r"needs \(data, scales\) of \(16, 1\) elements, "
                                         r"got \(15, 1\)"):
        quant.QuantizedWeight("nf4", q.data[:15], q.scales, q.shape, torch.float32, 64,
                              q.code)
    with pytest.raises(ValueError, match=r"must be 2-D"):
        quant.QuantizedWeight("nf4", q.data, q.scales, torch.Size([4, 2, 4]), torch.float32,
                              64, q.code)
    with pytest.raises(TypeError, match=r"Params4bit or Int8Params, got Parameter"):
        quant.from_bnb(nn.Parameter(torch.randn(3, 3)))


def _weights(kind, dtype, rows=37, cols=128):
    torch.manual_seed(7)
    w = torch.randn(rows, cols)
    p = int8params(w) if kind == "int8" else params4bit(w, kind)
    return quant.from_bnb(p, dtype)


def _fp64(w64, args, order, parametrization):
    """The float64 reference W' and its leaves (copies of ``args``)."""
    leaves = [t.detach().double().requires_grad_() for t in args]
    if parametrization == "lowrank":
        return lie_weight_lowrank_ref(w64, *leaves, order=order, scale=0.7), leaves
    return lie_weight_ref(w64, leaves[0], leaves[1:], order=order, scale=0.7), leaves


def _factors(parametrization, rows=37, cols=128):
    torch.manual_seed(1)
    if parametrization == "lowrank":
        return [(0.3 * torch.randn(5, cols)).requires_grad_(),
                (0.3 * torch.randn(rows, 5)).requires_grad_()]
    return [(0.3 * torch.randn(3, 4)).requires_grad_(), torch.randn(rows, 3).requires_grad_(),
            torch.randn(cols, 4).requires_grad_()]


def _lie(q, args, order, parametrization):
    if parametrization == "lowrank":
        return lk.lie_weight_lowrank(q, *args, order=order, scale=0.7)
    return lk.lie_weight(q, args[0], args[1:], order=order, scale=0.7)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("parametrization", ["lowrank", "tucker"])
def test_fused_op_on_a_quantized_weight_matches_fp64(monkeypatch, kind, order,
                                                     parametrization):
    """fp32 compute: W' and the factor gradients against the float64 reference on deq(W);
    blocks of 5 rows, each dequantized on its own (never the whole weight)."""
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", 5 * 128)
    q = _weights(kind, torch.float32)
    asked, rows = [], quant.QuantizedWeight.rows
    monkeypatch.setattr(quant.QuantizedWeight, "rows",
                        lambda self, r0, n, *a, **k: (asked.append(n), rows(self, r0, n, *a,
                                                                            **k))[1])
    args = _factors(parametrization)
    out = _lie(q, args, order, parametrization)
    g = torch.randn_like(out)
    out.backward(g)
    assert asked and max(asked) == 5  # block by block, forward and backward
    monkeypatch.setattr(quant.QuantizedWeight, "rows", rows)
    ref, leaves = _fp64(q.rows(0, 37).double(), args, order, parametrization)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6
    if order != 0:
        for t, r in zip(args, torch.autograd.grad(ref, leaves, g.double())):
            assert rel_err(t.grad, r) < 1e-5


@pytest.mark.parametrize("order", [1, 4])
def test_quantized_blocks_hold_whole_scale_blocks(monkeypatch, order):
    """A 4-bit W whose rows cut its scale blocks (100 columns, blocksize 64) is read in
    blocks of a multiple of 16 rows (whole scale blocks: bitsandbytes' own kernel, not the
    gather), whatever the block size; W' and the factor gradients as with one block."""
    q = quant.from_bnb(params4bit(torch.randn(53, 100), nested=False))
    assert [q.block_rows(e) for e in (1, 1600, 3300, 10 ** 6)] == [16, 16, 32, 10000]
    args = _factors("lowrank", rows=53, cols=100)
    whole = _lie(q, args, order, "lowrank")
    g = torch.randn_like(whole)
    ref = torch.autograd.grad(whole, args, g)
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", 2000)
    asked, rows = [], quant.QuantizedWeight.rows
    monkeypatch.setattr(quant.QuantizedWeight, "rows",
                        lambda self, r0, n, *a, **k: (asked.append((r0, n)),
                                                      rows(self, r0, n, *a, **k))[1])
    out = _lie(q, args, order, "lowrank")
    got = torch.autograd.grad(out, args, g)
    assert asked == list(row_slices(53, 16)) * 2  # forward, then backward
    assert rel_err(out, whole) < 1e-6
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, ref))


@pytest.mark.parametrize("order", [1, 2, 4, None])
def test_quantized_layer_keeps_no_block_buffer(monkeypatch, order):
    """Between calls a thread keeps nothing for a Lie layer on a quantized W but its
    W'-sized buffer: the block buffers of a quantized W are fresh, like its dequantized
    blocks, so none outlives the call (the step's peak, at the loss, holds none)."""
    monkeypatch.setattr(layer_ops, "FUSE_MIN_NUMEL", 0)
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", 16 * 128)
    lie = lk.nn.LieLinear(_bnb_linear("nf4", nn.Linear(128, 96)), rank=4, order=order)
    with torch.no_grad():
        lie.lie_b.normal_(0, 0.2)
    torch_backend.release_buffers()
    try:
        x = torch.randn(2, 5, 128)
        lie(x).square().sum().backward()  # x needs no gradient: backward alone
        lie(x.requires_grad_()).square().sum().backward()  # dx too: W' built in backward
        kept = {k: v.numel() for k, v in torch_backend._ARENA.slots.items()}
    finally:
        torch_backend.release_buffers()
    assert kept == {"out": 96 * 128 * 4}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", [1, None])
def test_16bit_compute_dtype_matches_the_same_math_in_16_bits(dtype, order):
    """W' in the compute dtype: within one rounding of that dtype of the fp64 value, as
    PyTorch's own formula in that dtype (deq(W)·exp in fp32, then cast)."""
    q = _weights("nf4", dtype)
    args = [t.detach().to(dtype).requires_grad_() for t in _factors("lowrank")]
    out = _lie(q, args, order, "lowrank")
    ref, _ = _fp64(q.rows(0, 37).double(), args, order, "lowrank")
    torch_math = (q.rows(0, 37) * lk.exp_series(0.7 * (args[1].float() @ args[0].float()),
                                                order)).to(dtype)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 2 * rel_err(torch_math, ref) + torch.finfo(dtype).eps


def test_compiled_backends_refuse_a_quantized_weight_with_the_reason():
    q = _weights("nf4", torch.float32)
    a, b = torch.randn(2, 128), torch.randn(37, 2)
    reasons = get_backend("cuda").not_supported_reasons(q, b, a, 1)
    assert any("nf4 quantized weight" in r for r in reasons)
    assert get_backend("torch").not_supported_reasons(q, b, a, 1) == []


def _bnb_linear(kind, base, compute_dtype=None):
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(base.in_features, base.out_features, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(base.in_features, base.out_features, quant_type=kind,
                              compute_dtype=compute_dtype)
    q.load_state_dict(base.state_dict())
    return q.to("cpu")


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("order", [0, 1, 2, 4, None])
@pytest.mark.parametrize("block_rows, one_node", [(None, True), (7, True), (None, False)])
def test_lie_linear_over_a_bitsandbytes_layer(monkeypatch, kind, order, block_rows, one_node):
    """A fresh layer computes what the bitsandbytes layer computes (4-bit: bitwise; int8:
    bitsandbytes multiplies int8 activations, we deq(W) in fp32); y, dx and the factor
    gradients equal the fp64 reference's (3-D, non-contiguous x; W whole or in blocks of
    7 rows; the one-node layer op, and the two-node path that W below
    ``FUSE_MIN_NUMEL`` takes); W itself gets none. On the one-node path W is dequantized
    in blocks, once in forward and once in backward (t for the factors, then W' for dx
    from the same block), never whole."""
    if block_rows:
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", block_rows * 128)
    if one_node:  # this 96x128 W is below the size that takes the one-node path
        monkeypatch.setattr(layer_ops, "FUSE_MIN_NUMEL", 0)
    torch.manual_seed(3)
    qlin = _bnb_linear(kind, nn.Linear(128, 96))
    x = torch.randn(2, 128, 5).transpose(1, 2).requires_grad_()  # (2, 5, 128), strided
    with torch.no_grad():
        y0 = qlin(x)
    lie = lk.nn.LieLinear(qlin, rank=4, order=order)
    assert lie.quantized and lie.weight_shape == (96, 128)
    with torch.no_grad():
        y1 = lie(x)
        assert torch.equal(y1, y0) if kind != "int8" and not block_rows else \
            rel_err(y1, y0) < 1e-6
        lie.lie_b.normal_(0, 0.2)
    asked, rows = [], quant.QuantizedWeight.rows
    monkeypatch.setattr(quant.QuantizedWeight, "rows",
                        lambda self, r0, n, *a, **k: (asked.append((r0, n)),
                                                      rows(self, r0, n, *a, **k))[1])
    y = lie(x)
    y.square().sum().backward()
    monkeypatch.setattr(quant.QuantizedWeight, "rows", rows)
    blocks = list(row_slices(96, block_rows or 96))
    if one_node and order != 0:  # (order 0: W' is W, and the layer reads it as W)
        assert asked == blocks * 2
    w64 = quant.layer_weight(qlin).rows(0, 96).double()
    a, b = (t.detach().double().requires_grad_() for t in (lie.lie_a, lie.lie_b))
    x64 = x.detach().double().requires_grad_()
    w1 = lie_weight_lowrank_ref(w64, a, b, order=order, scale=lie.scale)
    ref = nn.functional.linear(x64, w1, qlin.bias.double())
    ref.square().sum().backward()
    assert rel_err(y, ref) < 1e-5 and rel_err(x.grad, x64.grad) < 1e-5
    if order != 0:
        assert rel_err(lie.lie_a.grad, a.grad) < 1e-5 and rel_err(lie.lie_b.grad, b.grad) < 1e-5
    assert qlin.weight.grad is None and not qlin.weight.requires_grad


def test_compute_dtype_and_input_dtype_as_bitsandbytes():
    """x and bias run in the layer's compute dtype, y comes back in x's dtype."""
    qlin = _bnb_linear("nf4", nn.Linear(64, 32), torch.bfloat16)
    lie = lk.nn.LieLinear(qlin, rank=2)
    assert lie.lie_a.dtype == torch.bfloat16
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(lie(x), qlin(x)) and lie(x).dtype == torch.float32


def _quantized_model(kinds=("nf4", "int8")):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))
    model = nn.Sequential(_bnb_linear(kinds[0], dense[0]), nn.ReLU(),
                          _bnb_linear(kinds[1], dense[2]))
    lk.inject(model, rank=4, order=2)
    for _, m in lk.nn.lie_layers(model):
        with torch.no_grad():
            m.lie_b.normal_(0, 0.2)
    return model


def test_inject_adapts_bitsandbytes_layers_by_name_and_type():
    model = _quantized_model()
    assert [n for n, _ in lk.nn.lie_layers(model)] == ["0", "2"]
    plain = nn.Sequential(_bnb_linear("nf4", nn.Linear(8, 8)), nn.ReLU())
    lk.inject(plain, target_modules=[bnb.nn.Linear4bit], rank=2)
    assert isinstance(plain[0], lk.nn.LieLinear) and plain[0].quantized


def test_unload_refuses_dequantizes_or_requantizes():
    model = _quantized_model()
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"unload: Lie layers \['0', '2'\] wrap quantized "
                                         r".*quantized='dequantize'.*no layer was changed"):
        lk.unload(model)
    with pytest.raises(RuntimeError, match=r"cannot merge LieLinear: its base keeps W in nf4"):
        lk.merge(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                 for k in before)
    dense = lk.unload(copy.deepcopy(model), quantized="dequantize")
    assert type(dense[0]) is nn.Linear and type(dense[2]) is nn.Linear
    with torch.no_grad():
        assert torch.equal(dense(x), y)  # W' held exactly
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        requant = lk.unload(copy.deepcopy(model), quantized="requantize")
    assert type(requant[0]).__name__ == "Linear4bit"
    assert type(requant[2]).__name__ == "Linear8bitLt"
    assert [str(w.message).split(": max")[0] for w in seen] == [
        "unload: W' requantized into Linear4bit", "unload: W' requantized into Linear8bitLt"]
    with torch.no_grad():
        assert rel_err(requant(x), y) < 0.1  # lossy: the format's own rounding of W'
    with pytest.raises(ValueError, match=r"quantized must be one of"):
        lk.unload(model, quantized="round")


def test_state_dict_round_trip_of_a_quantized_lie_model():
    model = _quantized_model(("nf4", "nf4"))
    x = torch.randn(2, 128)
    state = model.state_dict()
    assert {k for k in state if "lie_" in k} == {
        f"{i}.lie_{n}" for i in (0, 2) for n in ("a", "b", "merged", "config")}
    fresh = _quantized_model(("nf4", "nf4"))
    for _, m in lk.nn.lie_layers(fresh):
        with torch.no_grad():
            m.lie_b.zero_()
    fresh.load_state_dict({k: v for k, v in state.items() if "lie_" in k}, strict=False)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_quantized_layer_under_torch_compile():
    """The quantized path runs eager inside a compiled function (a graph break): same
    output and gradients."""
    model = _quantized_model(("nf4", "nf4"))
    x = torch.randn(2, 128)
    eager = model(x)
    compiled = torch.compile(model, backend="eager")(x)
    assert torch.equal(compiled, eager)


# -- PEFT: HiRA's bitsandbytes layers fused, LieRA on a quantized base ----------------------
def _peft_base(kind, dims=(128, 192, 64)):
    """A quantized two-layer model as transformers' BitsAndBytesConfig leaves one (PEFT
    reads ``is_loaded_in_4bit``/``8bit`` to pick its bitsandbytes layers); rows a multiple
    of the blocksize (see the dequantization test for bitsandbytes' CPU kernel)."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(dims[0], dims[1]), nn.ReLU(), nn.Linear(dims[1], dims[2]))
    model = nn.Sequential(_bnb_linear(kind, dense[0]), nn.ReLU(), _bnb_linear(kind, dense[2]))
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = kind != "int8", kind == "int8"
    return model


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_patch_hira_fuses_peft_hira_on_bitsandbytes_layers(kind):
    """PEFT's HiRA Linear4bit/Linear8bitLt layers run on the fused op, which reads the
    packed weight: outputs and gradients equal PEFT's own within fp32 rounding."""
    peft = pytest.importorskip("peft")
    from lie_kernels.integrations.peft import patch_hira
    model = peft.get_peft_model(_peft_base(kind), peft.HiraConfig(r=4, target_modules=["0", "2"]))
    for name, p in model.named_parameters():
        if "hira_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.1)
    assert type(model.base_model.model[0]).__module__ == "peft.tuners.hira.bnb"
    x = torch.randn(5, 128)

    def run():
        model.zero_grad()
        y = model(x)
        y.square().sum().backward()
        return [y] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    want = run()
    handle = patch_hira(model)
    assert len(handle.layers) == 2 and handle.fallbacks == {}
    for g, w in zip(run(), want):
        assert rel_err(g, w) < 1e-5
    with pytest.raises(ValueError, match=r"found 2 HiRA layers, 2 of them patched already"):
        patch_hira(model)


def test_patch_hira_lists_bitsandbytes_layers_it_cannot_read():
    peft = pytest.importorskip("peft")
    from lie_kernels.integrations.peft import patch_hira
    model = peft.get_peft_model(_peft_base("nf4"), peft.HiraConfig(r=2, target_modules=["0", "2"]))
    model.base_model.model[2].get_base_layer().weight.quant_state.packing_format_for_cpu = True
    handle = patch_hira(model)
    assert [type(m).__name__ for m in handle.layers] == ["_FusedLinear4bit"]
    assert list(handle.fallbacks) == ["base_model.model.2"]
    assert "repacked for bitsandbytes' CPU inference" in handle.fallbacks["base_model.model.2"]


def test_liera_on_a_4bit_base_through_peft_saves_and_loads_bitwise(tmp_path):
    peft = pytest.importorskip("peft")
    from lie_kernels.integrations.peft import LieraConfig
    model = peft.get_peft_model(_peft_base("nf4"), LieraConfig(r=4, lora_alpha=4, order=4,
                                                               target_modules=["0", "2"]))
    assert type(model.base_model.model[0].base_layer).__name__ == "Linear4bit"
    x = torch.randn(3, 128)
    model(x).square().mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(_peft_base("nf4"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_fp8_weight_with_row_scales():
    """``float8_e4m3fn`` W with a scale per output channel: deq(W) = q · scale[row], and the
    fused op on it against the float64 reference."""
    torch.manual_seed(5)
    w = torch.randn(24, 40)
    scale = w.abs().amax(1) / torch.finfo(torch.float8_e4m3fn).max
    q8 = (w / scale[:, None]).to(torch.float8_e4m3fn)
    q = quant.QuantizedWeight("fp8", q8, scale, q8.shape, torch.float32)
    w64 = q8.double() * scale.double()[:, None]
    assert torch.equal(q.dequantize(), (q8.float() * scale[:, None]))
    a, b = (0.3 * torch.randn(3, 40)).requires_grad_(), (0.3 * torch.randn(24, 3)).requires_grad_()
    out = lk.lie_weight_lowrank(q, a, b, order=4, scale=0.5)
    leaves = [t.detach().double().requires_grad_() for t in (a, b)]
    ref = lie_weight_lowrank_ref(w64, *leaves, order=4, scale=0.5)
    g = torch.randn_like(out)
    out.backward(g)
    assert rel_err(out, ref) < 1e-6
    for t, r in zip((a, b), torch.autograd.grad(ref, leaves, g.double())):
        assert rel_err(t.grad, r) < 1e-5
