"""AWQ / GPTQ checkpoints read into the canonical layout (minicpm_int4/foreign.py).

The packers below write each format as its own package does (AutoAWQ's WQLinear_GEMM.from_linear,
AutoGPTQ's QuantLinear.pack: loops over columns / rows with shifts and ORs, uint32 arithmetic),
independently of the vectorised readers under test; the readers must give back the exact q, zero
points and scales they packed.
"""
import json
import os

import pytest
import torch

from minicpm_int4 import QuantConfig, QuantLinear, load_quantized, patch_model, save_quantized
from minicpm_int4.checkpoint import CheckpointMismatchError, load_pretrained_quantized
from minicpm_int4.foreign import (ForeignFormatError, awq_to_canonical, compressed_tensors_to_canonical, detect,
                                  gptq_to_canonical)
from minicpm_int4.packing import pack_int4, unpack_int4

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _int32(words):
    """uint32 values held in int64 -> the int32 with the same bits (as numpy's astype(int32))."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_pack(q, z, s):
    """AutoAWQ GEMM tensors from canonical q [N, K], zero points z [N, G] and scales s [N, G]."""
    iw, zw = q.t().to(torch.int64), z.t().to(torch.int64)  # [K, N], [G, N]
    qweight = torch.zeros(iw.shape[0], iw.shape[1] // 8, dtype=torch.int64)
    qzeros = torch.zeros(zw.shape[0], zw.shape[1] // 8, dtype=torch.int64)
    for col in range(iw.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= iw[:, col * 8 + AWQ_ORDER[i]] << (4 * i)
            qzeros[:, col] |= zw[:, col * 8 + AWQ_ORDER[i]] << (4 * i)
    return {"qweight": _int32(qweight), "qzeros": _int32(qzeros), "scales": s.t().contiguous()}


def gptq_pack(q, z, s, v1=True, group_size=None):
    """GPTQ tensors (v1: zero points stored minus 1, as uint32) from canonical q, z, s."""
    n, k = q.shape
    iw = q.t().to(torch.int64)                        # [K, N]
    zw = (z.t().to(torch.int64) - (1 if v1 else 0)) & 0xFFFFFFFF  # np.uint32 of zeros - 1
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for row in range(k // 8):
        for j in range(8):
            qweight[row] |= iw[8 * row + j] << (4 * j)
    qzeros = torch.zeros(zw.shape[0], n // 8, dtype=torch.int64)
    for col in range(n // 8):
        for j in range(8):
            qzeros[:, col] |= (zw[:, 8 * col + j] << (4 * j)) & 0xFFFFFFFF
    gs = group_size or k // z.shape[1]
    return {"qweight": _int32(qweight), "qzeros": _int32(qzeros), "scales": s.t().contiguous(),
            "g_idx": (torch.arange(k) // gs).to(torch.int32)}


def ct_pack(q, z, s, symmetric):
    """compressed-tensors pack-quantized tensors (pack_to_int32: signed values + 8 as uint32, weights
    packed along K, zero points along N) from canonical q, z, s; symmetric: z must be 8, not stored."""
    n, k = q.shape
    v = q.to(torch.int64)  # (q - 8) + 8: the stored value is the canonical q
    packed = torch.zeros(n, k // 8, dtype=torch.int64)
    for i in range(8):
        packed |= v[:, i::8] << (4 * i)
    out = {"weight_packed": _int32(packed), "weight_scale": s.contiguous(), "weight_shape": torch.tensor([n, k])}
    if symmetric:
        assert bool((z == 8).all())
        return out
    zp = torch.zeros(8 * ((n + 7) // 8), z.shape[1], dtype=torch.int64)
    zp[:n] = z.to(torch.int64)
    packed_zp = torch.zeros(zp.shape[0] // 8, z.shape[1], dtype=torch.int64)
    for i in range(8):
        packed_zp |= zp[i::8, :] << (4 * i)
    out["weight_zero_point"] = _int32(packed_zp)
    return out


def _random_layer(n, k, group_size, seed, zmin=0, zmax=15, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    q = torch.randint(0, 16, (n, k), generator=g)
    z = torch.randint(zmin, zmax + 1, (n, groups), generator=g)
    s = (torch.rand(n, groups, generator=g) * 0.02 + 1e-3).to(dtype)
    return q, z, s


LAYER_CASES = [(24, 96, 32), (40, 256, 64), (16, 384, 128), (24, 136, -1)]  # N, K, G (K = 136: per channel only)


@pytest.fixture(params=[2048, 16], ids=["one-chunk", "chunks-of-16-rows"])
def rows_per_chunk(request, monkeypatch):
    """The AWQ reader unpacks and repacks ROWS_PER_CHUNK output rows at a time: also in several chunks."""
    monkeypatch.setattr("minicpm_int4.foreign.ROWS_PER_CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("n,k,group_size", LAYER_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_awq_layer_reads_exactly(n, k, group_size, dtype, rows_per_chunk):
    q, z, s = _random_layer(n, k, group_size, seed=n + k, dtype=dtype)
    t = awq_pack(q, z, s)
    qweight, scales, zeros, perm = awq_to_canonical(t["qweight"], t["qzeros"], t["scales"], k, n, group_size)
    assert perm is None
    assert torch.equal(qweight, pack_int4(q)) and torch.equal(unpack_int4(qweight), q.to(torch.uint8))
    assert scales.dtype == zeros.dtype == dtype
    assert torch.equal(scales, s) and torch.equal(zeros, z.to(dtype))


@pytest.mark.parametrize("n,k,group_size", LAYER_CASES)
@pytest.mark.parametrize("v1", [True, False])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_layer_reads_exactly(n, k, group_size, v1, sym):
    # sym: every zero point 8 (stored 7 in v1); asym: 1..15 in v1 (it cannot store 0), 0..15 in v2
    lo, hi = (8, 8) if sym else ((1, 15) if v1 else (0, 15))
    q, z, s = _random_layer(n, k, group_size, seed=n * k, zmin=lo, zmax=hi)
    t = gptq_pack(q, z, s, v1=v1, group_size=k if group_size == -1 else group_size)
    qweight, scales, zeros, perm = gptq_to_canonical(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], k, n,
                                                     group_size, zero_offset=1 if v1 else 0)
    assert perm is None and torch.equal(qweight, pack_int4(q))
    assert torch.equal(scales, s) and torch.equal(zeros, z.to(s.dtype))
    # g_idx is optional (older checkpoints lack it)
    again = gptq_to_canonical(t["qweight"], t["qzeros"], t["scales"], None, k, n, group_size, zero_offset=1 if v1 else 0)
    assert all(torch.equal(a, b) for a, b in zip(again[:3], (qweight, scales, zeros))) and again.input_perm is None


@pytest.mark.parametrize("n,k,group_size", LAYER_CASES + [(20, 64, 32), (8, 64, 32), (3, 96, 32)])  # N = 20: zero points
# padded to 24 rows; N <= 8: one word of zero points per group (its transpose a column whose stride is not 1)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_compressed_tensors_layer_reads_exactly(n, k, group_size, symmetric, act_order):
    lo, hi = (8, 8) if symmetric else (0, 15)
    q, z, s = _random_layer(n, k, group_size, seed=n + 3 * k, zmin=lo, zmax=hi, dtype=torch.bfloat16)
    t = ct_pack(q, z, s, symmetric)
    gs = k if group_size == -1 else group_size
    g_idx = _act_order_g_idx(k, gs, seed=k) if act_order and group_size != -1 else None
    c = compressed_tensors_to_canonical(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"), g_idx, k, n,
                                        group_size)
    assert torch.equal(c.scales, s) and torch.equal(c.zeros, z.to(s.dtype))
    if g_idx is None:
        assert c.input_perm is None and torch.equal(c.qweight, pack_int4(q))
    else:  # columns in group order; the weight in channel order is the checkpoint's
        ql = QuantLinear(k, n, bias=False, group_size=group_size, dtype=torch.bfloat16, input_perm=True)
        for name, value in zip(("qweight", "scales", "zeros", "input_perm"), c):
            getattr(ql, name).copy_(value)
        assert torch.equal(ql.dequantized_weight(), _dequant_by_g_idx(q, z, s, g_idx))


def test_gptq_v1_zero_point_0_is_refused():
    """AutoGPTQ's v1 packing stores zero point 0 as -1 (uint32 0xFFFFFFFF), ORing ones into the zero
    points beside it: those layers cannot be read back, and the error says so."""
    q, z, s = _random_layer(16, 64, 32, seed=3, zmin=1)
    z[3, 1] = 0
    t = gptq_pack(q, z, s, v1=True)
    with pytest.raises(ForeignFormatError, match=r"model\.q_proj\.qzeros: a zero point reads 16 .* stored a zero point of 0"):
        gptq_to_canonical(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 64, 16, 32, zero_offset=1,
                          name="model.q_proj")
    # the same numbers in the v2 format read exactly
    t2 = gptq_pack(q, z, s, v1=False)
    _, _, zeros, _ = gptq_to_canonical(t2["qweight"], t2["qzeros"], t2["scales"], t2["g_idx"], 64, 16, 32, zero_offset=0)
    assert torch.equal(zeros, z.to(zeros.dtype))


def _act_order_g_idx(k, group_size, seed):
    """g_idx as GPTQ's desc_act=True makes it: channel order[i] (order: by decreasing activation, here
    random) is quantized i-th, in group i // G."""
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
    return g_idx


def _dequant_by_g_idx(q, z, s, g_idx):
    """The weight a GPTQ layer holds, in input-channel order: (q[n, k] - z[n, g]) * s[n, g], g = g_idx[k]."""
    gi = g_idx.long()
    return ((q.float() - z.float()[:, gi]) * s.float()[:, gi]).to(s.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gptq_act_order_layer_computes_with_permuted_input(dtype, rows_per_chunk):
    """desc_act=True: the groups are G channels each, scattered over K. Read with the channels sorted by
    group (input_perm), the layer's weight is exactly the checkpoint's and its forward is x @ W.T."""
    from helpers import assert_gemm_close

    n, k, gs = 40, 256, 64
    q, z, s = _random_layer(n, k, gs, seed=11, zmin=1, dtype=dtype)
    g_idx = _act_order_g_idx(k, gs, seed=12)
    t = gptq_pack(q, z, s)  # q in channel order; z, s per group
    c = gptq_to_canonical(t["qweight"], t["qzeros"], t["scales"], g_idx, k, n, gs, zero_offset=1, name="L")
    assert c.input_perm is not None and c.input_perm.dtype == torch.int32
    assert torch.equal(g_idx[c.input_perm.long()].long(), torch.arange(k) // gs)  # runs of K in that order
    ql = QuantLinear(k, n, bias=False, group_size=gs, dtype=dtype, input_perm=True, backend="torch")
    for name, value in zip(("qweight", "scales", "zeros", "input_perm"), c):
        getattr(ql, name).copy_(value)
    w = _dequant_by_g_idx(q, z, s, g_idx)
    assert torch.equal(ql.dequantized_weight(), w)
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(13)).to(dtype)
    y = ql(x)
    assert y.shape == (3, 5, n)
    assert_gemm_close(y.reshape(-1, n), torch.nn.functional.linear(x, w).reshape(-1, n), x.reshape(-1, k), w)
    assert "input_perm=True" in repr(ql)


def test_gptq_g_idx_that_is_no_grouping_is_refused():
    q, z, s = _random_layer(16, 128, 32, seed=4, zmin=1)
    t = gptq_pack(q, z, s)
    g_idx = t["g_idx"].clone()
    g_idx[0] = 1  # group 0 has 31 channels, group 1 has 33
    with pytest.raises(ForeignFormatError, match=r"layers\.0\.mlp\.up_proj\.g_idx: groups of 31 to 33 input channels"):
        gptq_to_canonical(t["qweight"], t["qzeros"], t["scales"], g_idx, 128, 16, 32, name="layers.0.mlp.up_proj")
    g_idx[0] = 4  # a group past the last
    with pytest.raises(ForeignFormatError, match=r"L\.g_idx: group numbers 0\.\.4, expected 4 groups of 32 numbered "
                                                 r"0\.\.3$"):
        gptq_to_canonical(t["qweight"], t["qzeros"], t["scales"], g_idx, 128, 16, 32, name="L")


@pytest.mark.parametrize("what,bad,match", [
    ("qweight", lambda t: t[:-1], r"L\.qweight: shape \(95, 3\), expected \(96, 3\)"),
    ("qweight", lambda t: t.to(torch.int64), r"L\.qweight: dtype torch\.int64, expected torch\.int32"),
    ("qzeros", lambda t: t[:, :2], r"L\.qzeros: shape \(3, 2\), expected \(3, 3\)"),
    ("scales", lambda t: t.to(torch.int32), r"L\.scales: dtype torch\.int32, expected a floating-point"),
    ("scales", lambda t: t.clone().fill_(float("nan")), r"L\.scales holds NaN"),
])
def test_awq_bad_tensors_are_named(what, bad, match):
    q, z, s = _random_layer(24, 96, 32, seed=5)
    t = awq_pack(q, z, s)
    t[what] = bad(t[what])
    with pytest.raises(ForeignFormatError, match=match):
        awq_to_canonical(t["qweight"], t["qzeros"], t["scales"], 96, 24, 32, name="L")


def _write_json(path, data):
    path.write_text(json.dumps(data))


def test_detect_reads_each_config_file(tmp_path):
    assert detect(tmp_path) is None  # no config at all
    _write_json(tmp_path / "config.json", {"model_type": "llama"})
    assert detect(tmp_path) is None  # a plain model
    _write_json(tmp_path / "config.json", {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                                    "zero_point": True, "version": "gemm"}})
    f = detect(tmp_path)
    assert (f.method, f.group_size, f.zero_offset, f.source) == ("awq", 128, 0, "config.json")
    _write_json(tmp_path / "config.json", {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 64,
                                                                    "desc_act": False, "sym": True}})
    assert (detect(tmp_path).method, detect(tmp_path).zero_offset) == ("gptq", 1)
    _write_json(tmp_path / "config.json", {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": -1,
                                                                    "checkpoint_format": "gptq_v2"}})
    assert (detect(tmp_path).group_size, detect(tmp_path).zero_offset) == (-1, 0)
    _write_json(tmp_path / "config.json", {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                                                    "format": "gptq_v2"}})  # GPTQModel's newer key
    assert detect(tmp_path).zero_offset == 0
    _write_json(tmp_path / "config.json", {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    assert detect(tmp_path) is None  # not one this module reads (nf4 is not an integer grid)
    # AutoGPTQ's own quantize_config.json beside a config.json without quantization_config
    _write_json(tmp_path / "config.json", {"model_type": "llama"})
    _write_json(tmp_path / "quantize_config.json", {"bits": 4, "group_size": 128, "desc_act": False})
    assert (detect(tmp_path).method, detect(tmp_path).source) == ("gptq", "quantize_config.json")
    os.remove(tmp_path / "quantize_config.json")
    # older AutoAWQ's quant_config.json; this package's own quant_config.json (format_version) is not foreign
    _write_json(tmp_path / "quant_config.json", {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"})
    assert (detect(tmp_path).method, detect(tmp_path).group_size) == ("awq", 64)
    _write_json(tmp_path / "quant_config.json", {"format_version": 1, "config": {}, "modules": {}})
    assert detect(tmp_path) is None


def _ct_config(**weights):
    w = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32, "actorder": None,
         **weights}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": None}},
            "ignore": ["lm_head"]}


def test_detect_reads_compressed_tensors(tmp_path):
    _write_json(tmp_path / "config.json", {"quantization_config": _ct_config()})
    f = detect(tmp_path)
    assert (f.method, f.group_size, f.symmetric, f.weight_key) == ("compressed-tensors", 32, False, "weight_packed")
    _write_json(tmp_path / "config.json", {"quantization_config": _ct_config(strategy="channel", group_size=None,
                                                                             symmetric=True)})
    assert (detect(tmp_path).group_size, detect(tmp_path).symmetric) == (-1, True)


@pytest.mark.parametrize("change,match", [
    (lambda c: c.update(format="int-quantized"), r"format \['int-quantized'\]: only 'pack-quantized'"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=8), r"int weights of 8 bits"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(strategy="tensor"), r"strategy 'tensor'"),
    (lambda c: c["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "dynamic": True}),
     r"quantizes activations as well"),
    (lambda c: c["config_groups"].update(group_1={"targets": ["re:.*mlp.*"], "weights": {"num_bits": 4, "group_size": 64}}),
     r"different weight schemes"),
    (lambda c: c.update(quantization_status="frozen"), r"quantization_status 'frozen'"),
])
def test_detect_refuses_compressed_tensors_it_cannot_read(tmp_path, change, match):
    qc = _ct_config()
    change(qc)
    _write_json(tmp_path / "config.json", {"quantization_config": qc})
    with pytest.raises(ForeignFormatError, match=match):
        detect(tmp_path)


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, r"bits=8: only 4-bit"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, r"'gemv' layout: only AWQ's GEMM"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, r"without zero points"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, r"checkpoint_format='marlin'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, r"group_size=0"),
])
def test_detect_refuses_what_it_cannot_read_exactly(tmp_path, qc, match):
    _write_json(tmp_path / "config.json", {"quantization_config": qc})
    with pytest.raises(ForeignFormatError, match=match):
        detect(tmp_path)


# --- whole checkpoints: a patched tiny MiniCPM-V 4.6 written as AWQ / GPTQ, read back ---------------------------


def _native_or_skip(seed=0):
    """A tiny random MiniCPM-V 4.6 in fp16 built as from_pretrained builds one (dtype given to the
    constructor: rotary inv_freq stays fp32, where .half() of a built model would round it)."""
    from minicpm_int4.models import hf_dtype_kwargs
    from minicpm_int4.tiny import NATIVE_KINDS, NativeModelUnavailable, _transformers_class, native_config

    try:
        cls = _transformers_class(NATIVE_KINDS["4_6"][1])
        cfg = native_config("4_6")
    except NativeModelUnavailable as e:
        pytest.skip(f"no native MiniCPM-V 4.6 in this transformers: {e}")
    torch.manual_seed(seed)
    return cls._from_config(cfg, **hf_dtype_kwargs(torch.float16)).eval()


def _write_foreign(model, path, method, v1=True, bin_shards=False, act_order=False):
    """Write patched `model` as an AWQ / GPTQ checkpoint: config.json with that quantization_config,
    the QuantLinears' numbers in the format's layout, every other tensor as saved by transformers.
    act_order (GPTQ): each layer's groups scattered over K as desc_act=True leaves them (a model of
    other weights, then). Returns {layer: (q, z, s, g_idx)} as written."""
    from safetensors.torch import save_file

    path.mkdir()
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.update(architectures=[type(model).__name__], dtype="float16", torch_dtype="float16")
    cfg["quantization_config"] = (_ct_config() if method == "compressed-tensors" else
                                  {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                   "version": "gemm"} if method == "awq" else
                                  {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": act_order, "sym": False,
                                   **({} if v1 else {"checkpoint_format": "gptq_v2"})})
    _write_json(path / "config.json", cfg)
    _write_json(path / "generation_config.json", {"eos_token_id": [3, 7], "max_new_tokens": 5})  # as published folders have
    tensors, written = {}, {}
    for i, (name, mod) in enumerate(model.named_modules()):
        if isinstance(mod, QuantLinear):
            q, z, s = unpack_int4(mod.qweight), mod.zeros.round().to(torch.int64), mod.scales
            packed = (ct_pack(q, z, s, symmetric=False) if method == "compressed-tensors" else awq_pack(q, z, s)
                      if method == "awq" else gptq_pack(q, z, s, v1=v1, group_size=32))
            if act_order:
                packed["g_idx"] = _act_order_g_idx(q.shape[1], 32, seed=i)
            written[name] = (q, z, s, packed.get("g_idx"))
            tensors.update({f"{name}.{k}": v for k, v in packed.items()})
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias.detach().clone()
    for key, t in model.state_dict().items():
        owner = model.get_submodule(key.rpartition(".")[0])
        if not isinstance(owner, QuantLinear):
            tensors[key] = t.detach().clone().contiguous()
    if not bin_shards:  # GPTQ: the file name AutoGPTQ gives it (model_file_base_name unset)
        save_file(tensors, str(path / ("gptq_model-4bit-32g.safetensors" if method == "gptq" else "model.safetensors")))
        return written
    for name, buf in model.named_buffers():  # older checkpoints hold rotary inv_freq, which the model computes
        if name.endswith("inv_freq") and name not in tensors:
            tensors[name] = buf.clone()
    assert any(k.endswith("inv_freq") for k in tensors)
    keys = sorted(tensors)  # two pytorch_model-*.bin shards and their index, as older checkpoints have
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for fname, ks in shards.items():
        torch.save({k: tensors[k] for k in ks}, str(path / fname))
    _write_json(path / "pytorch_model.bin.index.json", {"weight_map": {k: f for f, ks in shards.items() for k in ks}})
    return written


@pytest.mark.parametrize("method,v1,bin_shards", [("awq", True, False), ("gptq", True, False), ("gptq", False, True),
                                                  ("compressed-tensors", True, False)])
def test_foreign_checkpoint_runs_as_the_model_it_was_written_from(tmp_path, method, v1, bin_shards):
    from minicpm_int4.tiny import prompt_with_image

    model = _native_or_skip()
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    if method == "gptq" and v1:  # v1 cannot store a zero point of 0 (see above): use 1..15
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.zeros.clamp_(min=1)
    _write_foreign(model, tmp_path / "ckpt", method, v1, bin_shards)

    loaded = load_pretrained_quantized(str(tmp_path / "ckpt"))
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert loaded.generation_config.eos_token_id == [3, 7] and loaded.generation_config.max_new_tokens == 5
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == len(report.quantized)
    for name, m in layers.items():
        ref = model.get_submodule(name)
        for what in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(m, what), getattr(ref, what)), (name, what)
        assert m.group_size == 32 and m.dtype == torch.float16
    ids, pv, ts = prompt_with_image(model)
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=pv.half(), target_sizes=ts).logits
        assert torch.equal(loaded(input_ids=ids, pixel_values=pv.half(), target_sizes=ts).logits, want)
    # written again in this package's format, it reloads to the same model, and config.json no longer
    # says AWQ / GPTQ (transformers would try those quantizers on it)
    save_quantized(loaded, tmp_path / "int4")
    hf_cfg = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert hf_cfg.get("quantization_config", {}).get("quant_method") != method
    again = load_pretrained_quantized(str(tmp_path / "int4"))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, pixel_values=pv.half(), target_sizes=ts).logits, want)


def test_act_order_gptq_checkpoint_loads_saves_and_reloads(tmp_path):
    """desc_act=True layers: each QuantLinear holds the checkpoint's weight in input-channel order
    (through input_perm), and this package's checkpoint of them (quant_config.json records input_perm)
    reloads - by load_pretrained_quantized and by transformers' from_pretrained - to the same logits."""
    import transformers

    from minicpm_int4.hf_integration import register
    from minicpm_int4.tiny import prompt_with_image

    model = _native_or_skip()
    patch_model(model, QuantConfig(group_size=32), progress=False)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.zeros.clamp_(min=1)
    written = _write_foreign(model, tmp_path / "ckpt", "gptq", act_order=True)
    loaded = load_pretrained_quantized(str(tmp_path / "ckpt"), progress=False)
    for name, (q, z, s, g_idx) in written.items():
        layer = loaded.get_submodule(name)
        assert layer.input_perm is not None
        assert torch.equal(layer.dequantized_weight(), _dequant_by_g_idx(q, z, s, g_idx)), name
    save_quantized(loaded, tmp_path / "int4")
    specs = json.loads((tmp_path / "int4" / "quant_config.json").read_text())["modules"]
    assert all(specs[name].get("input_perm") for name in written)
    ids, pv, ts = prompt_with_image(model)
    inputs = dict(input_ids=ids, pixel_values=pv.half(), target_sizes=ts)
    with torch.no_grad():
        want = loaded(**inputs).logits
        assert torch.equal(load_pretrained_quantized(str(tmp_path / "int4"), progress=False)(**inputs).logits, want)
        if register() is None:
            hf = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "int4")).eval()
            assert torch.equal(hf(**inputs).logits, want)
    # a checkpoint whose input_perm is no permutation is refused by name, not left to fail in a kernel
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "int4" / "model.safetensors"))
    victim = next(k for k in tensors if k.endswith(".input_perm"))
    tensors[victim][0] = tensors[victim][1]
    save_file(tensors, str(tmp_path / "int4" / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=rf"{victim[:-len('.input_perm')]}: input_perm is not a permutation"):
        load_pretrained_quantized(str(tmp_path / "int4"), progress=False)


def test_foreign_checkpoint_into_a_built_model_and_its_errors(tmp_path):
    from minicpm_int4.tiny import prompt_with_image

    model = _native_or_skip()
    patch_model(model, QuantConfig(group_size=32), progress=False)
    _write_foreign(model, tmp_path / "ckpt", "awq")
    fresh = _native_or_skip(seed=9)  # other weights: all must come from the file
    load_quantized(fresh, str(tmp_path / "ckpt"), progress=False)
    ids, pv, ts = prompt_with_image(model)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, pixel_values=pv.half(), target_sizes=ts).logits,
                           model(input_ids=ids, pixel_values=pv.half(), target_sizes=ts).logits)
    with pytest.raises(CheckpointMismatchError, match="AWQ .* load it into a model that is not patched"):
        load_quantized(fresh, str(tmp_path / "ckpt"), progress=False)
    # in another dtype: the other tensors cast as from_pretrained(dtype=) casts them; fp16 scales that bf16
    # rounds are converted with a warning that names the way to keep them exact
    with pytest.warns(UserWarning, match=r"hold scales that the model's dtype rounds.*dtype=<the scales' dtype>"):
        bf16 = load_pretrained_quantized(str(tmp_path / "ckpt"), dtype=torch.bfloat16, progress=False)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert all(m.dtype == torch.bfloat16 for m in bf16.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        assert torch.isfinite(bf16(input_ids=ids, pixel_values=pv.bfloat16(), target_sizes=ts).logits).all()
    save_quantized(bf16, tmp_path / "int4-bf16")
    with pytest.raises(ValueError, match=r"dtype=torch.float16\) is for AWQ / GPTQ / compressed-tensors checkpoints"):
        load_pretrained_quantized(str(tmp_path / "int4-bf16"), dtype=torch.float16)
    # a layer without its scales
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    victim = next(k for k in tensors if k.endswith(".scales"))
    del tensors[victim]
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=rf"{victim[:-len('.scales')]}' has a qweight but no scales"):
        load_quantized(_native_or_skip(), str(tmp_path / "ckpt"), progress=False)


def test_remote_code_awq_checkpoint_and_the_cli(tmp_path, capsys):
    """MiniCPM-V 2.x / o-2.6 are remote code, and their AWQ checkpoints carry the modeling files
    beside config.json (auto_map): read with trust_remote_code=True, as from_pretrained asks."""
    import shutil

    import transformers
    from test_checkpoint import _remote_code_checkpoint

    from minicpm_int4.models import hf_dtype_kwargs

    ckpt = _remote_code_checkpoint(tmp_path)
    model = transformers.AutoModel.from_pretrained(str(ckpt), trust_remote_code=True,
                                                   **hf_dtype_kwargs(torch.float16)).eval()
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    out = tmp_path / "awq"
    _write_foreign(model, out, "awq")
    for f in os.listdir(ckpt):
        if f.endswith(".py"):
            shutil.copy(ckpt / f, out / f)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_pretrained_quantized(str(out))
    loaded = load_pretrained_quantized(str(out), trust_remote_code=True, progress=False)
    assert type(loaded).__name__ == "TinyV"
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == len(report.quantized)
    ids = torch.randint(6, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    pv = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2)).half()
    with torch.no_grad():
        assert torch.equal(model(ids, pv).logits, loaded(ids, pv).logits)
    # the CLI: convert writes this package's format; eval compares the AWQ folder with the original as it is
    from helpers import save_word_tokenizer, write_word_prompts
    from minicpm_int4.cli import main

    remote = ["--trust-remote-code", "--device", "cpu"]
    assert main(["convert", str(out), str(tmp_path / "int4"), *remote]) == 0
    assert f"{len(report.quantized)} int4 layers (group size 32) read exactly from AWQ (GEMM)" in capsys.readouterr().out
    converted = load_pretrained_quantized(str(tmp_path / "int4"), trust_remote_code=True, progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids, pv).logits, converted(ids, pv).logits)
    save_word_tokenizer(ckpt)
    prompts = tmp_path / "prompts.txt"
    write_word_prompts(prompts)
    assert main(["eval", str(ckpt), str(out), *remote, "--dtype", "fp16", "--prompts", str(prompts)]) == 0
    assert "next-token KL divergence" in capsys.readouterr().out
    # user errors: one line, exit code 2
    assert main(["convert", str(ckpt), str(tmp_path / "x"), *remote]) == 2
    assert "is not an AWQ, GPTQ or compressed-tensors int4 checkpoint" in capsys.readouterr().err
    assert main(["quantize", str(out), str(tmp_path / "x"), *remote]) == 2
    assert "is already an int4 checkpoint (AWQ (GEMM)): `minicpm-int4 convert" in capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8
    _write_json(out / "config.json", cfg)
    assert main(["convert", str(out), str(tmp_path / "y"), *remote]) == 2
    assert "bits=8: only 4-bit checkpoints can be read" in capsys.readouterr().err
