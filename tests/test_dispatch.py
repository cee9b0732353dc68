"""backend="auto" on CUDA: a measured table decides between the Triton kernel and the CUDA extension."""
import json

import pytest

from minicpm_int4.dispatch import m_bucket, table_from_bench, w4a16_auto_backend


def _bench(device_name, rows):
    return {"env": {"device_name": device_name, "commit": "abc", "timestamp_utc": "t"},
            "rows": [dict(r, check="ok") for r in rows]}


def test_table_records_what_was_timed_beside_triton_and_lookup_uses_it(tmp_path):
    rows = [
        {"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-triton", "median_ms": 0.010},
        {"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-cuda", "median_ms": 0.008},   # cuda wins
        {"n": 4096, "k": 4096, "m": 16, "backend": "w4a16-triton", "median_ms": 0.012},
        {"n": 4096, "k": 4096, "m": 16, "backend": "w4a16-cuda", "median_ms": 0.020},  # triton wins
        {"n": 1024, "k": 4096, "m": 2, "backend": "w4a16-cuda", "median_ms": 0.001},   # no triton row: no claim
    ]
    table = table_from_bench(_bench("GPU-A", rows))
    assert table["devices"]["GPU-A"]["w4a16"] == [
        {"n": 4096, "k": 4096, "m": 1, "backend": "cuda", "times_ms": {"cuda": 0.008, "triton": 0.010}},
        {"n": 4096, "k": 4096, "m": 16, "backend": "triton", "times_ms": {"cuda": 0.020, "triton": 0.012}}]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    pick = lambda m, n, k, dev="GPU-A": w4a16_auto_backend(m, n, k, 0, True, str(path), dev)  # noqa: E731
    assert pick(1, 4096, 4096) == "cuda"
    assert pick(16, 4096, 4096) == "triton"
    assert pick(9, 4096, 4096) == "triton"          # bucket 16, measured slower
    assert pick(2, 4096, 4096) == "triton"          # the nearest measured decode M is 16 (M = 1 runs other kernels)
    assert pick(1, 4096, 4096, "GPU-B") == "triton"  # another GPU: nothing measured, nothing guessed
    assert pick(1, 4096, 8192) == "triton"           # unmeasured shape
    assert pick(64, 4096, 4096) == "triton"          # beyond the CUDA kernel's range
    assert w4a16_auto_backend(1, 4096, 4096, 0, False, str(path), "GPU-A") == "triton"  # extension not built


def test_a_gpu_without_an_entry_reads_a_measured_gpu_of_the_same_compute_capability(tmp_path, monkeypatch):
    """An H100 where the table has only an H200 (both sm_90): "auto" takes the H200's picks - for W4A16, the
    activation quantizer and W4A8 - not "triton" everywhere; a GPU of another architecture, an entry without its
    capability (a table written before it was recorded) or SAME_ARCH off: "triton". Its own entry, once
    measured, wins over a borrowed one; among several of the same capability, the one with the most entries."""
    from minicpm_int4 import dispatch

    def bench(name, capability, w4a16_winner, extra_shapes=0, sm_count=132):
        rows = [{"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-triton", "median_ms": 0.010},
                {"n": 4096, "k": 4096, "m": 1, "backend": f"w4a16-{w4a16_winner}", "median_ms": 0.008}]
        for i in range(extra_shapes):  # more entries ("triton" winning them)
            rows += [{"n": 512 * (i + 1), "k": 4096, "m": 1, "backend": b, "median_ms": t}
                     for b, t in (("w4a16-triton", 0.001), ("w4a16-cuda", 0.002))]
        rows += [{"n": 4096, "k": 4096, "m": 4096, "backend": b, "median_ms": t}
                 for b, t in (("w4a8-triton", 0.5), ("w4a8-cuda", 0.3))]
        b = _bench(name, rows)
        b["env"].update(capability=capability, sm_count=sm_count)
        b["act_quant"] = [{"m": 4096, "k": 4096, "backend": c, "median_ms": t, "check": "ok"}
                          for c, t in (("triton", 0.05), ("cuda", 0.04))]
        return b

    table = table_from_bench(bench("NVIDIA H200", "9.0", "cuda"))
    assert table["devices"]["NVIDIA H200"]["capability"] == "9.0" and table["devices"]["NVIDIA H200"]["sm_count"] == 132
    table = table_from_bench(bench("NVIDIA A100", "8.0", "triton-tc"), table)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))

    def picks(name, capability, same_arch=True, sm_count=132):
        monkeypatch.setattr(dispatch, "_device_identity", lambda index: (name, capability, sm_count))
        monkeypatch.setattr(dispatch, "SAME_ARCH", same_arch)
        dispatch._table_device.cache_clear()
        return (w4a16_auto_backend(1, 4096, 4096, 0, True, str(path)),
                dispatch.act_quant_auto_backend(4096, 4096, 0, True, str(path)),
                dispatch.w4a8_auto_backend(4096, 4096, 4096, 128, 0, True, str(path)))

    assert picks("NVIDIA H200", "9.0") == ("cuda", "cuda", "cuda")            # its own
    assert picks("NVIDIA H100 80GB HBM3", "9.0") == ("cuda", "cuda", "cuda")   # the H200's
    assert picks("NVIDIA A100-SXM4-80GB", "8.0") == ("triton-tc", "cuda", "cuda")  # the A100's, not the H200's
    assert picks("NVIDIA H100 80GB HBM3", "9.0", same_arch=False) == ("triton",) * 3
    assert picks("NVIDIA L40S", "8.9") == ("triton",) * 3                       # no measured GPU of sm_89
    assert picks("NVIDIA H100 80GB HBM3", "9.0") == ("cuda", "cuda", "cuda")   # (the setting is read per call)
    assert dispatch.table_entry_for("NVIDIA H100 80GB HBM3", "9.0", str(path)) == "NVIDIA H200"
    assert dispatch.table_entry_for("NVIDIA H100 80GB HBM3", None, str(path)) is None  # capability unknown
    # a table written before the capability was recorded: its entries match their own GPU only
    old = json.loads(path.read_text())
    for e in old["devices"].values():
        del e["capability"], e["sm_count"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert dispatch.table_entry_for("NVIDIA H100 80GB HBM3", "9.0", str(tmp_path / "old.json")) is None
    assert dispatch.table_entry_for("NVIDIA H200", "9.0", str(tmp_path / "old.json")) == "NVIDIA H200"
    # the H100 measured: its own entry from then on; a third sm_90 GPU takes the one with more entries
    table = table_from_bench(bench("NVIDIA H100 80GB HBM3", "9.0", "triton-tc", extra_shapes=2), table)
    path2 = tmp_path / "table2.json"
    path2.write_text(json.dumps(table))
    path = path2
    assert picks("NVIDIA H100 80GB HBM3", "9.0")[0] == "triton-tc"
    assert picks("NVIDIA H200", "9.0")[0] == "cuda"
    assert dispatch.table_entry_for("NVIDIA GH200 480GB", "9.0", str(path2)) == "NVIDIA H100 80GB HBM3"
    assert picks("NVIDIA GH200 480GB", "9.0")[0] == "triton-tc"
    # the SM count nearest first (split-K plans and waves follow it), before the number of entries
    table = table_from_bench(bench("GPU-114", "9.0", "cuda-gemv", sm_count=114), table)
    path = tmp_path / "table3.json"
    path.write_text(json.dumps(table))
    assert picks("NVIDIA H100 PCIe", "9.0", sm_count=114)[0] == "cuda-gemv"
    assert picks("NVIDIA H100 PCIe", "9.0", sm_count=120)[0] == "cuda-gemv"  # 6 SMs off, not 12
    assert picks("NVIDIA GH200 480GB", "9.0", sm_count=132)[0] == "triton-tc"
    assert dispatch.table_entry_for("NVIDIA H100 PCIe", "9.0", str(path)) == "NVIDIA H100 80GB HBM3"  # SMs unknown


def test_describe_says_whose_entry_a_gpu_reads(tmp_path, monkeypatch):
    """describe() (result files' env, `minicpm-int4 env`) names the GPU a borrowed entry was measured on, and
    the reports say so in words; a GPU with its own entry, or none, has no such key."""
    from minicpm_int4 import dispatch
    from minicpm_int4.bench.report import _env_lines

    b = _bench("NVIDIA H200", [{"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-triton", "median_ms": 0.010},
                               {"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-cuda", "median_ms": 0.008}])
    b["env"]["capability"] = "9.0"
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table_from_bench(b)))
    monkeypatch.setattr(dispatch, "TABLE_PATH", str(path))
    d = dispatch.describe("NVIDIA H100 80GB HBM3", "9.0")
    assert d["this_device"] == "NVIDIA H100 80GB HBM3" and d["this_device_entry"] == "NVIDIA H200"
    assert d["this_device_capability"] == "9.0" and d["this_device_rules"] == 1
    assert d["this_device_picks"]["w4a16"] == {"cuda": 1}
    line = next(x for x in _env_lines({"device_name": "NVIDIA H100 80GB HBM3", "dispatch_table": d})
                if "dispatch table" in x)
    assert line == ("- backend=\"auto\": dispatch table made from this run's bench, 1 measured rule(s) for this GPU, "
                    "NVIDIA H200's "
                    "(none of its own; the same compute capability 9.0; MINICPM_INT4_DISPATCH_SAME_ARCH=0 turns this "
                    "off) (`minicpm_int4/dispatch.py`)")
    for name, cap in (("NVIDIA H200", "9.0"), ("NVIDIA A100", "8.0"), ("NVIDIA H100 80GB HBM3", None)):
        d = dispatch.describe(name, cap)
        assert "this_device_entry" not in d and dispatch.borrowed_from(d) == ""
        assert d["this_device_rules"] == (1 if name == "NVIDIA H200" else 0)
    monkeypatch.setattr(dispatch, "SAME_ARCH", False)
    assert dispatch.describe("NVIDIA H100 80GB HBM3", "9.0")["this_device_rules"] == 0


def test_the_committed_table_records_each_gpus_capability():
    """What a GPU of the same architecture matches on: every entry of the package's table has it."""
    from minicpm_int4.dispatch import PACKAGE_TABLE_PATH

    with open(PACKAGE_TABLE_PATH) as f:
        devices = json.load(f)["devices"]
    assert devices and all(e.get("capability") and e.get("sm_count") for e in devices.values())
    assert devices["NVIDIA H200"]["capability"] == "9.0"


def test_decode_m_takes_the_measured_decode_m_nearest_on_a_log_scale(tmp_path):
    """2..16 rows: the decode kernels stream W once whatever M, so an M whose bucket (next power of two) was not
    measured takes the entry at the measured decode M nearest that bucket (log scale, the larger on a tie) -
    never M = 1's, where other kernels run."""
    t = {1: (0.010, 0.001), 4: (0.010, 0.020), 16: (0.012, 0.008)}  # M: (triton, cuda)
    rows = [{"n": 4096, "k": 4096, "m": m, "backend": b, "median_ms": ms} for m, pair in t.items()
            for b, ms in zip(("w4a16-triton", "w4a16-cuda"), pair)]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table_from_bench(_bench("GPU-A", rows))))
    pick = lambda m: w4a16_auto_backend(m, 4096, 4096, 0, True, str(path), "GPU-A")  # noqa: E731
    # M = 2: bucket 2, nearest 4; 3 - 4: bucket 4; 5 - 8: bucket 8, as far from 4 as from 16 (the larger); 9 - 16: 16
    assert [pick(m) for m in range(1, 17)] == ["cuda"] + ["triton"] * 3 + ["cuda"] * 12


def test_prefill_takes_the_entry_at_the_largest_measured_m_at_or_below(tmp_path, monkeypatch):
    """Past M = 16 "triton-dq" (the weight dequantized whole, then torch's matmul) against the fused prefill
    kernel: every M where both were timed is an entry (those "triton" won too), and a query takes the
    entry at the largest measured M at or below its own - the dequantization is a fixed cost that a
    larger M only amortises - else "triton"."""
    rows = []
    for m, fused, dq in ((64, 0.010, 0.030), (256, 0.030, 0.040), (1024, 0.100, 0.080), (4096, 0.400, 0.300)):
        rows += [{"n": 4096, "k": 4096, "m": m, "backend": "w4a16-triton", "median_ms": fused},
                 {"n": 4096, "k": 4096, "m": m, "backend": "w4a16-triton-dq", "median_ms": dq}]
    rows += [{"n": 1024, "k": 4096, "m": 4096, "backend": "w4a16-triton", "median_ms": 0.1},  # no dq row: no claim
             {"n": 4096, "k": 4096, "m": 16, "backend": "w4a16-triton", "median_ms": 0.01},
             {"n": 4096, "k": 4096, "m": 16, "backend": "w4a16-triton-dq", "median_ms": 0.001},  # not an M <= 16 choice
             {"n": 4096, "k": 4096, "m": 256, "backend": "w4a16-cuda", "median_ms": 0.001}]  # nor is cuda past 16
    table = table_from_bench(_bench("GPU-A", rows))
    assert [(r["n"], r["m"], r["backend"]) for r in table["devices"]["GPU-A"]["w4a16"]] == [
        (4096, 64, "triton"), (4096, 256, "triton"), (4096, 1024, "triton-dq"), (4096, 4096, "triton-dq")]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    pick = lambda m, n=4096, ext=True: w4a16_auto_backend(m, n, 4096, 0, ext, str(path), "GPU-A")  # noqa: E731
    assert [pick(m) for m in (16, 17, 63, 64, 300, 1023)] == ["triton"] * 6
    assert [pick(m) for m in (1024, 2000, 4096, 100000)] == ["triton-dq"] * 4
    assert pick(4096, ext=False) == "triton-dq"  # a Triton path: the extension does not matter
    assert pick(4096, n=1024) == "triton"       # unmeasured: nothing guessed
    # a weight whose fp16 copy would pass DEQUANT_MAX_BYTES keeps the fused kernel whatever was measured
    import minicpm_int4.dispatch as dispatch

    monkeypatch.setattr(dispatch, "DEQUANT_MAX_BYTES", 2 * 4096 * 4096 - 1)
    assert pick(4096) == "triton"


def test_activation_quantizer_takes_the_faster_measured_at_its_k_and_nearest_m(tmp_path):
    """The per-token quantizer: the bench's act_quant rows (both backends timed; a failed check is no time)
    become entries per (K, M); a query takes its K's entry at the measured M nearest its own (log scale,
    the larger on a tie), "triton" for an unmeasured K or without the extension."""
    from minicpm_int4.dispatch import act_quant_auto_backend

    bench = _bench("GPU-A", [])
    row = lambda k, m, backend, ms, **kw: dict(k=k, m=m, backend=backend, median_ms=ms, **kw)  # noqa: E731
    bench["act_quant"] = [
        row(4096, 1, "triton", 2.1), row(4096, 1, "cuda", 2.3), row(4096, 4096, "triton", 18.0),
        row(4096, 4096, "cuda", 21.0), row(14336, 1, "triton", 4.8), row(14336, 1, "cuda", 4.4),
        row(14336, 4096, "triton", 142.0), row(14336, 4096, "cuda", 68.0),
        row(3072, 64, "triton", 3.0),  # one backend only: no entry
        row(768, 64, "triton", 3.0), row(768, 64, "cuda", 1.0, check="mismatch")]  # a wrong kernel: no time
    table = table_from_bench(bench)
    entries = table["devices"]["GPU-A"]["act_quant"]
    assert [(e["k"], e["m"], e["backend"]) for e in entries] == [
        (4096, 1, "triton"), (4096, 4096, "triton"), (14336, 1, "cuda"), (14336, 4096, "cuda")]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    pick = lambda m, k, ext=True: act_quant_auto_backend(m, k, 0, ext, str(path), "GPU-A")  # noqa: E731
    assert [pick(m, 14336) for m in (1, 16, 64, 4096, 65536)] == ["cuda"] * 5
    assert [pick(m, 4096) for m in (1, 64, 4096)] == ["triton"] * 3
    assert pick(4096, 14336, ext=False) == "triton" and pick(4096, 3072) == "triton" and pick(64, 768) == "triton"
    assert act_quant_auto_backend(4096, 14336, 0, True, str(path), "GPU-B") == "triton"  # another GPU


def test_activation_quantizer_warps_variants_are_candidates(tmp_path, monkeypatch):
    # the Triton quantizer with 4 / 16 warps a row (the bench's triton-4w / triton-16w rows) joins the entries;
    # a query takes the fastest that can run (without the extension: the fastest Triton one), and ops runs the
    # pick's warps for the call
    import torch

    from minicpm_int4 import ops
    from minicpm_int4.dispatch import act_quant_auto_backend

    bench = _bench("GPU-A", [])
    row = lambda k, m, backend, ms: dict(k=k, m=m, backend=backend, median_ms=ms)  # noqa: E731
    bench["act_quant"] = [row(4096, 4096, "triton", 18.0), row(4096, 4096, "triton-4w", 19.0),
                          row(4096, 4096, "triton-16w", 15.0), row(4096, 4096, "cuda", 14.0),
                          row(768, 1, "triton", 2.0), row(768, 1, "triton-4w", 1.9)]
    table = table_from_bench(bench)
    assert [(e["k"], e["backend"]) for e in table["devices"]["GPU-A"]["act_quant"]] == [(768, "triton-4w"),
                                                                                         (4096, "cuda")]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    pick = lambda m, k, ext: act_quant_auto_backend(m, k, 0, ext, str(path), "GPU-A")  # noqa: E731
    assert (pick(4096, 4096, True), pick(4096, 4096, False), pick(1, 768, False)) == ("cuda", "triton-16w", "triton-4w")
    calls = []

    class Kernels:
        @staticmethod
        def quantize_per_token_int8_triton(x, input_scale=None, input_perm=None, warps=None):
            calls.append(warps)
            return torch.zeros(x.shape, dtype=torch.int8), torch.ones(x.shape[0])

    monkeypatch.setattr(ops, "_triton_kernels", lambda: (Kernels, None))
    for picked in ("triton", "triton-4w", "triton-16w"):
        monkeypatch.setattr(ops, "resolve_backend", lambda *a, picked=picked, **kw: picked)
        ops._quantize_per_token_int8_op(torch.randn(3, 64), "auto")
    assert calls == [None, 4, 16]


def test_w4a8_takes_the_faster_measured_path_at_its_shape_nearest_m_and_group_size(tmp_path):
    """The W4A8 GEMM: the bench's w4a8-triton / w4a8-cuda rows (quantizer + GEMM, both timed and checked) become
    entries per (N, K, M) with the bench's group size; a query takes its (N, K)'s entry at the measured M
    nearest its own (log scale, the larger on a tie), only at that group size, and "triton" without the
    extension or for an unmeasured shape."""
    from minicpm_int4.dispatch import w4a8_auto_backend

    row = lambda n, k, m, backend, ms, **kw: dict(n=n, k=k, m=m, backend=backend, median_ms=ms, **kw)  # noqa: E731
    bench = _bench("GPU-A", [
        row(4096, 4096, 256, "w4a8-triton", 0.10), row(4096, 4096, 256, "w4a8-cuda", 0.12),
        row(4096, 4096, 4096, "w4a8-triton", 1.00), row(4096, 4096, 4096, "w4a8-cuda", 0.60),
        row(768, 3072, 4096, "w4a8-triton", 0.20),                          # one path only: no entry
        row(1024, 4096, 4096, "w4a8-triton", 0.3), row(1024, 4096, 4096, "w4a16-triton", 0.1)])
    bench["rows"].append(row(768, 768, 4096, "w4a8-cuda", 0.01, check="mismatch"))  # a wrong kernel: no time
    bench["rows"].append(row(768, 768, 4096, "w4a8-triton", 0.05, check="ok"))
    bench["config"] = {"group_size": 64}
    table = table_from_bench(bench)
    entries = table["devices"]["GPU-A"]["w4a8"]
    assert entries == [{"n": 4096, "k": 4096, "m": 256, "group_size": 64, "backend": "triton",
                        "times_ms": {"cuda": 0.12, "triton": 0.10}},
                       {"n": 4096, "k": 4096, "m": 4096, "group_size": 64, "backend": "cuda",
                        "times_ms": {"cuda": 0.60, "triton": 1.00}}]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    pick = lambda m, n=4096, k=4096, g=64, ext=True, dev="GPU-A": w4a8_auto_backend(m, n, k, g, 0, ext, str(path), dev)  # noqa: E731
    assert [pick(m) for m in (17, 256, 700, 1024, 2048, 4096, 65536)] == \
        ["triton", "triton", "triton", "cuda", "cuda", "cuda", "cuda"]  # 1024: as far from both, the larger
    assert pick(4096, g=128) == "triton" and pick(4096, ext=False) == "triton" and pick(4096, dev="GPU-B") == "triton"
    assert pick(4096, n=768, k=3072) == "triton" and pick(4096, n=768, k=768) == "triton"


def test_w4a8_variants_are_candidates_where_they_can_run(tmp_path):
    """The bench's W4A8 variant rows (w4a8-triton-flat, w4a8-cuda-mma / -m64 / -t64 / -t128) join the entries
    beside w4a8-triton and w4a8-cuda; the wgmma kernel's fused epilogue (w4a8-cuda-fma: not the reference's
    bits) does not. A query takes the fastest that can run: the CUDA ones with the extension taking the layer,
    the forced wgmma ones only with their block tokens allowed on this GPU."""
    from minicpm_int4.dispatch import W4A8_CANDIDATES, w4a8_auto_backend

    times = {"w4a8-triton": 1.0, "w4a8-triton-flat": 0.9, "w4a8-cuda": 0.8, "w4a8-cuda-mma": 0.7,
             "w4a8-cuda-m64": 0.65, "w4a8-cuda-t128": 0.6, "w4a8-cuda-t64": 0.5, "w4a8-cuda-fma": 0.1}
    bench = _bench("GPU-A", [{"n": 4096, "k": 4096, "m": 4096, "backend": b, "median_ms": t} for b, t in times.items()]
                   + [{"n": 1024, "k": 4096, "m": 4096, "backend": "w4a8-cuda-t64", "median_ms": 0.1}])  # no baseline
    bench["config"] = {"group_size": 128}
    table = table_from_bench(bench)
    [entry] = table["devices"]["GPU-A"]["w4a8"]
    assert entry["backend"] == "cuda-t64" and sorted(entry["times_ms"]) == sorted(W4A8_CANDIDATES)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    pick = lambda ext, tokens=(): w4a8_auto_backend(4096, 4096, 4096, 128, 0, ext, str(path), "GPU-A", tokens)  # noqa: E731
    assert pick(True, {64, 128}) == "cuda-t64"
    assert pick(True, {128}) == "cuda-t128"   # 64-token wgmma blocks turned off on this GPU
    assert pick(True) == "cuda-m64"           # no wgmma here: the fastest mma.sync
    assert pick(False, {64, 128}) == "triton-flat"  # no extension: the faster Triton kernel


@pytest.mark.parametrize("pick,args", [("cuda", (0, 0)), ("cuda-mma", (0, 1)), ("cuda-m64", (64, 1)),
                                       ("cuda-t64", (64, 2)), ("cuda-t128", (128, 2)), ("triton", None),
                                       ("triton-flat", None)])
def test_w4a8_pick_reaches_its_kernel(pick, args, monkeypatch):
    # ops runs a W4A8 pick: the extension's GEMM with the variant's (block_rows, kernel), or the Triton GEMM,
    # "triton-flat" with each group's K steps unrolled for that call
    import torch

    from minicpm_int4 import ops

    calls = []

    class Ext:
        @staticmethod
        def w4a8_gemm(x_q, x_scale, qweight, scales, zeros, bias, group_size, out_dtype, block_rows, kernel):
            calls.append((block_rows, kernel))
            return torch.zeros(x_q.shape[0], qweight.shape[0], dtype=out_dtype)

    class Kernels:
        @staticmethod
        def w4a8_gemm_triton(x_q, x_scale, qweight, scales, zeros, bias, group_size, out_dtype, flat=None):
            calls.append(flat)
            return torch.zeros(x_q.shape[0], qweight.shape[0], dtype=out_dtype)

    monkeypatch.setattr(ops, "resolve_backend", lambda *a, **kw: pick)
    monkeypatch.setattr(ops, "_cuda_ext", lambda: (Ext, None))
    monkeypatch.setattr(ops, "_triton_kernels", lambda: (Kernels, None))
    x_q, x_scale = torch.zeros(32, 64, dtype=torch.int8), torch.ones(32)
    qweight, scales = torch.zeros(8, 8, dtype=torch.int32), torch.ones(8, 2, dtype=torch.float16)
    ops._w4a8_gemm_op(x_q, x_scale, qweight, scales, scales, None, 32, torch.float16, "auto")
    assert calls == [args if args is not None else (True if pick == "triton-flat" else None)]


def test_w4a8_auto_forces_wgmma_only_where_the_extension_reports_it(monkeypatch):
    # the block tokens "auto" may force the wgmma kernel to come from the extension's own report for the GPU.
    # The stand-in replaces the package's attribute too: where the real extension is built and was imported
    # (a CUDA torch), `from . import _C` finds that attribute before sys.modules
    import sys
    import types

    import minicpm_int4
    from minicpm_int4 import ops

    for report, tokens in (("wgmma (warpgroup MMA, sm_90a), 64- or 128-token blocks by the launcher's waves rule",
                            {64, 128}),
                           ("wgmma, 128-token blocks only (its 64-token blocks are turned off by ...)", {128}),
                           ("mma.sync (no sm_90a build of the wgmma kernel for this GPU: ...)", set())):
        fake = types.ModuleType("minicpm_int4._C")
        fake.w4a8_kernel = lambda report=report: report
        monkeypatch.setitem(sys.modules, "minicpm_int4._C", fake)
        monkeypatch.setattr(minicpm_int4, "_C", fake, raising=False)
        monkeypatch.setattr(ops.torch.cuda, "device", lambda index: __import__("contextlib").nullcontext())
        ops._w4a8_wgmma_tokens.cache_clear()
        assert ops._w4a8_wgmma_tokens(0) == tokens
    monkeypatch.undo()
    ops._w4a8_wgmma_tokens.cache_clear()


def test_m1_picks_the_fastest_of_gemv_tensor_core_and_cuda(tmp_path):
    # at M = 1 the Triton tensor-core decode kernel competes with the GEMV ("triton") and the CUDA
    # extension; without the extension the lookup falls back to the better Triton kernel
    rows = [
        {"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-triton", "median_ms": 0.010},
        {"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-triton-tc", "median_ms": 0.009},
        {"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-cuda", "median_ms": 0.007},
        {"n": 1024, "k": 4096, "m": 1, "backend": "w4a16-triton", "median_ms": 0.004},
        {"n": 1024, "k": 4096, "m": 1, "backend": "w4a16-triton-tc", "median_ms": 0.003},
        {"n": 1024, "k": 4096, "m": 1, "backend": "w4a16-cuda", "median_ms": 0.005},
        {"n": 2048, "k": 4096, "m": 1, "backend": "w4a16-triton", "median_ms": 0.004},
        {"n": 2048, "k": 4096, "m": 1, "backend": "w4a16-triton-tc", "median_ms": 0.006},
        {"n": 4096, "k": 4096, "m": 4, "backend": "w4a16-triton", "median_ms": 0.012},
        {"n": 4096, "k": 4096, "m": 4, "backend": "w4a16-triton-tc", "median_ms": 0.001},  # not an M = 4 choice
    ]
    table = table_from_bench(_bench("GPU-A", rows))
    assert [(r["n"], r["m"], r["backend"]) for r in table["devices"]["GPU-A"]["w4a16"]] == [
        (1024, 1, "triton-tc"), (2048, 1, "triton"), (4096, 1, "cuda")]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    pick = lambda n, ext, m=1: w4a16_auto_backend(m, n, 4096, 0, ext, str(path), "GPU-A")  # noqa: E731
    assert pick(4096, True) == "cuda"
    assert pick(4096, False) == "triton-tc"   # no extension: the faster Triton kernel
    assert pick(1024, True) == "triton-tc"
    assert pick(2048, True) == "triton"       # the GEMV measured faster: no entry
    assert pick(4096, True, m=4) == "triton"


def test_the_cuda_ring_variant_is_a_candidate_where_measured_faster(tmp_path, monkeypatch):
    # the bench's w4a16-cuda-ring rows (launcher variant 4) enter the table like w4a16-cuda's, M <= 16 only;
    # without the extension the lookup falls back to Triton
    times = {(4096, 1): (0.010, 0.008, 0.006), (1024, 1): (0.004, 0.003, 0.0035),
             (4096, 64): (0.02, None, 0.01)}  # (N, M): Triton, CUDA, ring; M = 64 is not a ring choice
    rows = [{"n": n, "k": 4096, "m": m, "backend": b, "median_ms": t} for (n, m), ts in times.items()
            for b, t in zip(("w4a16-triton", "w4a16-cuda", "w4a16-cuda-ring"), ts) if t is not None]
    table = table_from_bench(_bench("GPU-A", rows))
    assert [(r["n"], r["m"], r["backend"]) for r in table["devices"]["GPU-A"]["w4a16"]] == [
        (1024, 1, "cuda"), (4096, 1, "cuda-ring")]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    assert w4a16_auto_backend(1, 4096, 4096, 0, True, str(path), "GPU-A") == "cuda-ring"
    assert w4a16_auto_backend(1, 4096, 4096, 0, False, str(path), "GPU-A") == "triton"
    assert w4a16_auto_backend(1, 1024, 4096, 0, True, str(path), "GPU-A") == "cuda"
    from minicpm_int4 import ops

    assert ops.cuda_mma_supported(4096, 4096) and ops.cuda_mma_supported(4096, 32)
    assert not ops.cuda_mma_supported(4096, 16) and not ops.cuda_mma_supported(4304, 4304)


def test_the_cuda_wgmma_prefill_gemm_is_a_candidate_past_16_rows(tmp_path, monkeypatch):
    # the bench's w4a16-cuda-wgmma rows (launcher variant 5, the warpgroup-MMA prefill GEMM) enter the table past
    # M = 16 only, beside the Triton prefill kernels; without the extension the lookup keeps to Triton's
    times = {(4096, 256): (0.030, 0.040, 0.020), (4096, 4096): (0.400, 0.300, 0.250), (1024, 4096): (0.1, 0.2, 0.3),
             (4096, 16): (0.010, None, 0.001)}  # (N, M): fused Triton, dq, wgmma; M = 16 is not a wgmma choice
    rows = [{"n": n, "k": 4096, "m": m, "backend": b, "median_ms": t} for (n, m), ts in times.items()
            for b, t in zip(("w4a16-triton", "w4a16-triton-dq", "w4a16-cuda-wgmma"), ts) if t is not None]
    table = table_from_bench(_bench("GPU-A", rows))
    assert [(r["n"], r["m"], r["backend"]) for r in table["devices"]["GPU-A"]["w4a16"]] == [
        (1024, 4096, "triton"), (4096, 256, "cuda-wgmma"), (4096, 4096, "cuda-wgmma")]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    pick = lambda m, n=4096, ext=True: w4a16_auto_backend(m, n, 4096, 0, ext, str(path), "GPU-A")  # noqa: E731
    assert [pick(m) for m in (256, 1000, 4096, 100000)] == ["cuda-wgmma"] * 4
    assert pick(16) == "triton" and pick(255) == "triton"
    assert pick(4096, ext=False) == "triton-dq" and pick(256, ext=False) == "triton"
    assert pick(4096, n=1024) == "triton"
    # the unsplit kernel's rows (w4a16-cuda-wgmma-nosplit, variant 6) beside them: the faster of the two is the pick
    rows += [{"n": 4096, "k": 4096, "m": 256, "backend": "w4a16-cuda-wgmma-nosplit", "median_ms": 0.015}]
    path = tmp_path / "table2.json"  # (the lookup reads a path's table once)
    path.write_text(json.dumps(table_from_bench(_bench("GPU-A", rows))))
    assert pick(256) == "cuda-wgmma-nosplit" and pick(4096) == "cuda-wgmma"
    assert pick(256, ext=False) == "triton"


@pytest.mark.parametrize("pick,variant", [("cuda-wgmma", 5), ("cuda-wgmma-nosplit", 6)])
@pytest.mark.parametrize("runs", [True, False], ids=["runs", "does-not-run"])
def test_a_cuda_wgmma_pick_runs_its_variant_where_it_takes_the_layer_else_triton(runs, pick, variant, monkeypatch):
    # "cuda-wgmma" runs the launcher's variant 5 ("cuda-wgmma-nosplit" 6: its split-K off; input scale and channel
    # order passed on: the bindings apply them) for a layer the kernel takes (K % 64 == 0; a group of 32, a power of
    # two from 64, or per channel) on a GPU where it runs; else the Triton kernels - never the extension's variant 0
    # past 16 rows (its decode kernel in slices) and never an error from the op
    import torch

    from minicpm_int4 import ops

    seen = []

    class Ext:
        @staticmethod
        def w4a16_gemm(x, qweight, scales, zeros, bias, group_size, variant, input_scale, input_perm):
            seen.append(("cuda", variant, input_scale is not None, input_perm is not None))
            return x.new_zeros((x.shape[0], qweight.shape[0]))

    class Kernels:
        @staticmethod
        def w4a16_gemm_triton(x, qweight, *args, **kwargs):
            seen.append(("triton",))
            return x.new_zeros((x.shape[0], qweight.shape[0]))

    monkeypatch.setattr(ops, "resolve_backend", lambda *args, **kwargs: pick)
    monkeypatch.setattr(ops, "_cuda_ext", lambda: (Ext, None))
    monkeypatch.setattr(ops, "_triton_kernels", lambda: (Kernels, None))
    monkeypatch.setattr(ops, "cuda_wgmma_w4a16_runs", lambda device_index: runs)
    x, qweight = torch.randn(20, 256, dtype=torch.float16), torch.zeros(8, 32, dtype=torch.int32)
    scales = torch.ones(8, 2, dtype=torch.float16)
    ops._w4a16_gemm_op(x, qweight, scales, scales, None, 128, "auto")
    ops._w4a16_gemm_op(x, qweight, scales, scales, None, 128, "auto", None, torch.ones(256, dtype=torch.float16),
                       torch.randperm(256, generator=torch.Generator().manual_seed(0)).to(torch.int32))
    x96, q96 = torch.randn(20, 192, dtype=torch.float16), torch.zeros(8, 24, dtype=torch.int32)
    s96 = torch.ones(8, 2, dtype=torch.float16)
    ops._w4a16_gemm_op(x96, q96, s96, s96, None, 96, "auto")  # K % 64 == 0 but a group of 96: not the kernel's
    x320, q320 = torch.randn(20, 320, dtype=torch.float16), torch.zeros(8, 40, dtype=torch.int32)
    s320 = torch.ones(8, 10, dtype=torch.float16)
    ops._w4a16_gemm_op(x320, q320, s320, s320, None, 32, "auto")  # K = 320, G = 32: the kernel's
    if runs:
        assert seen == [("cuda", variant, False, False), ("cuda", variant, True, True), ("triton",),
                        ("cuda", variant, False, False)]
    else:
        assert seen == [("triton",)] * 4
    assert ops.cuda_wgmma_w4a16_supported(4096, 4096) and ops.cuda_wgmma_w4a16_supported(18944, 18944)
    assert ops.cuda_wgmma_w4a16_supported(3584, 128) and ops.cuda_wgmma_w4a16_supported(768, 32)
    assert not ops.cuda_wgmma_w4a16_supported(4304, 4304) and not ops.cuda_wgmma_w4a16_supported(384, 192)
    assert not ops.cuda_wgmma_w4a16_supported(256, 16)


@pytest.mark.parametrize("pick,variant,plain_tc_only", [("cuda", 0, False), ("cuda-gemv", 1, False),
                                                        ("cuda-ahead2", 3, True), ("cuda-ring", 4, True)])
def test_a_cuda_pick_runs_its_launcher_variant_where_it_takes_the_layer(pick, variant, plain_tc_only, monkeypatch):
    # ops runs a CUDA pick as its launcher variant; the lookahead variants (two chunks ahead, the ring) only where
    # the tensor-core kernel takes the layer with plain x, else the extension's own choice (variant 0)
    import torch

    from minicpm_int4 import ops

    seen = []

    class Ext:
        @staticmethod
        def w4a16_gemm(x, qweight, scales, zeros, bias, group_size, variant, input_scale, input_perm):
            seen.append(variant)
            return x.new_zeros((x.shape[0], qweight.shape[0]))

    monkeypatch.setattr(ops, "resolve_backend", lambda *args, **kwargs: pick)
    monkeypatch.setattr(ops, "_cuda_ext", lambda: (Ext, None))
    x, qweight = torch.randn(2, 256, dtype=torch.float16), torch.zeros(8, 32, dtype=torch.int32)
    scales = torch.ones(8, 2, dtype=torch.float16)
    ops._w4a16_gemm_op(x, qweight, scales, scales, None, 128, "auto")
    ops._w4a16_gemm_op(x, qweight, scales, scales, None, 128, "auto", None, torch.ones(256, dtype=torch.float16))
    ops._w4a16_gemm_op(x, qweight, scales, scales, None, 128, "auto", None, None,
                       torch.randperm(256, generator=torch.Generator().manual_seed(0)).to(torch.int32))
    x96, q96 = torch.randn(2, 192, dtype=torch.float16), torch.zeros(8, 24, dtype=torch.int32)
    s96 = torch.ones(8, 2, dtype=torch.float16)
    ops._w4a16_gemm_op(x96, q96, s96, s96, None, 96, "auto")  # K % 128 != 0: not the tensor-core kernel's
    assert seen == ([variant, 0, 0, 0] if plain_tc_only else [variant] * 4)


@pytest.mark.parametrize("pick", ["triton", "triton-tc", "triton-prefetch", "triton-unsplit", "triton-h2",
                                  "triton-direct", "triton-trip32", "triton-staged", "triton-dq", "triton-rhs"])
def test_auto_runs_the_triton_variant_the_table_picked(pick, monkeypatch):
    # ops hands a Triton variant the table picked to the Triton launcher as `variant` (one setting changed for
    # that call); "triton-tc" only with the layer's workspace (it was measured so: without one, the GEMV), and
    # "triton-dq" not for an fp32 layer (its fused kernel is exact fp32; torch's matmul would follow TF32)
    import torch

    from minicpm_int4 import ops

    calls = []

    class Kernels:
        @staticmethod
        def w4a16_gemm_triton(x, qweight, scales, zeros, bias, group_size, workspace, input_scale=None,
                              input_perm=None, variant=None):
            calls.append(variant)
            return x.new_zeros((x.shape[0], qweight.shape[0]))

    monkeypatch.setattr(ops, "resolve_backend", lambda *args, **kwargs: pick)
    monkeypatch.setattr(ops, "_triton_kernels", lambda: (Kernels, None))
    qweight = torch.zeros(8, 8, dtype=torch.int32)
    for dtype in (torch.float16, torch.float32):
        scales = torch.ones(8, 2, dtype=dtype)
        for workspace in (ops.w4a16_workspace(8), None):
            ops._w4a16_gemm_op(torch.randn(1, 64, dtype=dtype), qweight, scales, scales, None, 32, "auto", workspace)
    expect = None if pick == "triton" else pick
    assert calls == [expect, None if pick == "triton-tc" else expect,
                     None if pick == "triton-dq" else expect, None if pick in ("triton-tc", "triton-dq") else expect]


def test_every_triton_candidate_is_a_variant_of_the_kernels_and_a_bench_row():
    # dispatch.py's Triton candidates, kernels/w4a16.py's VARIANTS (what a call runs for each) and the bench's
    # rows that measure them (w4a16-<candidate>, timed under the module switch of the same setting) are one list;
    # each row is timed at (at least) an M its candidate is a choice at
    from minicpm_int4.bench.backends import default_backends
    from minicpm_int4.dispatch import TRITON_CANDIDATES, _CANDIDATE_M
    from minicpm_int4.kernels import w4a16

    assert set(TRITON_CANDIDATES) == set(w4a16.VARIANTS)
    rows = {b.name: b for b in default_backends()}
    for cand, (first, last) in _CANDIDATE_M.items():
        row = rows[f"w4a16-{cand}"]
        assert row.supports(first) and (last is None or not row.supports(last + 1)), cand
        assert first == 1 or not row.supports(first - 1), cand


def test_triton_variants_enter_the_table_at_their_m_only(tmp_path):
    # a variant's rows count where the candidate is a choice: the GEMV's at M = 1, the long decode trip's at
    # 2..16, the prefill tile's past 16; elsewhere the row is no claim
    times = {("w4a16-triton-prefetch", 1): 0.008, ("w4a16-triton-prefetch", 16): 0.001,
             ("w4a16-triton-unsplit", 1): 0.009, ("w4a16-triton-trip32", 1): 0.001,
             ("w4a16-triton-trip32", 16): 0.011, ("w4a16-triton-trip32", 64): 0.001,
             ("w4a16-triton-rhs", 16): 0.001, ("w4a16-triton-rhs", 256): 0.030, ("w4a16-triton-rhs", 4096): 0.300}
    base = {1: 0.010, 16: 0.012, 64: 0.02, 256: 0.025, 4096: 0.400}
    rows = [{"n": 4096, "k": 4096, "m": m, "backend": "w4a16-triton", "median_ms": t} for m, t in base.items()]
    rows += [{"n": 4096, "k": 4096, "m": m, "backend": b, "median_ms": t} for (b, m), t in times.items()]
    table = table_from_bench(_bench("GPU-A", rows))
    assert [(r["m"], r["backend"], sorted(r["times_ms"])) for r in table["devices"]["GPU-A"]["w4a16"]] == [
        (1, "triton-prefetch", ["triton", "triton-prefetch", "triton-unsplit"]),
        (16, "triton-trip32", ["triton", "triton-trip32"]),
        (256, "triton", ["triton", "triton-rhs"]), (4096, "triton-rhs", ["triton", "triton-rhs"])]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    pick = lambda m: w4a16_auto_backend(m, 4096, 4096, 0, False, str(path), "GPU-A")  # noqa: E731
    assert [pick(m) for m in (1, 2, 9, 16, 17, 256, 4095, 4096, 8192)] == [
        "triton-prefetch", "triton-trip32", "triton-trip32", "triton-trip32", "triton", "triton", "triton",
        "triton-rhs", "triton-rhs"]  # (M = 2: the measured decode M nearest its bucket, 16)


def test_cuda_backend_gets_the_input_scale_and_perm_and_the_unscaled_x(monkeypatch):
    # the CUDA extension multiplies a layer's input scale into its loads of x and reads x through an
    # act-order layer's channel order (its bindings gather first where a kernel does not): ops hands it
    # x as it is, the scale and the order (no x * m or x[:, perm] pass before it), for the W4A16 kernels
    # and the activation quantizer
    import torch

    from minicpm_int4 import ops

    seen = []

    class Ext:
        @staticmethod
        def w4a16_gemm(x, qweight, scales, zeros, bias, group_size, variant, input_scale, input_perm):
            seen.append(("w4a16", x, variant, input_scale, input_perm))
            return x.new_zeros((x.shape[0], qweight.shape[0]))

        @staticmethod
        def quantize_per_token_int8(x, input_scale, input_perm):
            seen.append(("act", x, None, input_scale, input_perm))
            return torch.zeros(x.shape, dtype=torch.int8), torch.ones(x.shape[0])

    monkeypatch.setattr(ops, "resolve_backend", lambda *args, **kwargs: "cuda")
    monkeypatch.setattr(ops, "_cuda_ext", lambda: (Ext, None))
    x, qweight = torch.randn(3, 64, dtype=torch.float16), torch.zeros(8, 8, dtype=torch.int32)
    scales = torch.ones(8, 2, dtype=torch.float16)
    m = torch.full((64,), 2.0, dtype=torch.float16)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    ops._w4a16_gemm_op(x, qweight, scales, scales, None, 32, "cuda", None, m)
    ops._quantize_per_token_int8_op(x, "cuda", m)
    ops._w4a16_gemm_op(x, qweight, scales, scales, None, 32, "cuda")
    ops._w4a16_gemm_op(x, qweight, scales, scales, None, 32, "cuda", None, None, perm)
    ops._quantize_per_token_int8_op(x, "cuda", None, perm)
    assert [(kind, variant) for kind, _, variant, _, _ in seen] == [
        ("w4a16", 0), ("act", None), ("w4a16", 0), ("w4a16", 0), ("act", None)]
    assert all(torch.equal(got_x, x) for _, got_x, _, _, _ in seen)  # never x * m, never x[:, perm]
    assert seen[0][3] is not None and torch.equal(seen[0][3], m) and torch.equal(seen[1][3], m)
    assert seen[2][3] is None and all(s[3] is None for s in seen[3:])
    assert all(s[4] is None for s in seen[:3]) and all(torch.equal(s[4], perm) for s in seen[3:])
    # ops.CUDA_FUSE_INPUT_PERM = False (what input_scale_cost.py times against): torch gathers x first
    seen.clear()
    monkeypatch.setattr(ops, "CUDA_FUSE_INPUT_PERM", False)
    ops._w4a16_gemm_op(x, qweight, scales, scales, None, 32, "cuda", None, None, perm)
    ops._quantize_per_token_int8_op(x, "cuda", None, perm)
    assert [s[0] for s in seen] == ["w4a16", "act"]
    assert all(torch.equal(s[1], x[:, perm.long()]) and s[4] is None for s in seen)


def test_tables_merge_per_device():
    a = table_from_bench(_bench("GPU-A", []))
    b = table_from_bench(_bench("GPU-B", []), a)
    assert set(b["devices"]) == {"GPU-A", "GPU-B"}


def test_m_buckets():
    assert [m_bucket(m) for m in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]


def test_no_table_is_shipped_until_measured():
    # the committed package must not carry an unmeasured dispatch table
    import os
    from minicpm_int4.dispatch import PACKAGE_TABLE_PATH
    if os.path.exists(PACKAGE_TABLE_PATH):
        t = json.load(open(PACKAGE_TABLE_PATH))
        for dev, entry in t["devices"].items():
            assert entry["commit"] and entry["timestamp_utc"], dev


def test_a_table_named_by_the_environment_is_what_auto_reads(tmp_path):
    """benchmarks/make_dispatch_table.py --out writes a table of its own from a bench result, and
    MINICPM_INT4_DISPATCH_TABLE (read at import) makes "auto" use it: the GPU suite's profile runs on the
    table its own bench just measured. describe() and the result files' env say which table it was."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(_bench("GPU-A", [
        {"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-triton", "median_ms": 0.010},
        {"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-triton-tc", "median_ms": 0.007}])))
    table = tmp_path / "table.json"
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MINICPM_INT4_DISPATCH_TABLE", None)
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "make_dispatch_table.py"), str(bench),
                        "--out", str(table)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "on GPU-A" in r.stdout and "fastest: triton-tc 1 (of 1 entries)" in r.stdout
    assert [x["backend"] for x in json.loads(table.read_text())["devices"]["GPU-A"]["w4a16"]] == ["triton-tc"]
    probe = ("import json; from minicpm_int4 import dispatch as d; "
             "print(json.dumps([d.describe('GPU-A'), d.w4a16_auto_backend(1, 4096, 4096, 0, False, device_name='GPU-A')]))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       env=dict(env, MINICPM_INT4_DISPATCH_TABLE=str(table)))
    assert r.returncode == 0, r.stderr
    described, pick = json.loads(r.stdout.splitlines()[-1])
    assert pick == "triton-tc"
    assert described == {"path": str(table), "from_env": True, "exists": True, "devices": ["GPU-A"],
                         "this_device": "GPU-A", "this_device_rules": 1, "this_device_act_quant_entries": 0,
                         "this_device_w4a8_entries": 0,
                         "this_device_picks": {"w4a16": {"triton-tc": 1}, "act_quant": {}, "w4a8": {}}}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)  # the package's
    described, pick = json.loads(r.stdout.splitlines()[-1])
    assert pick == "triton" and not described["from_env"] and described["this_device_rules"] == 0
    missing = str(tmp_path / "missing.json")  # a wrong path: a warning, and nothing guessed
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       env=dict(env, MINICPM_INT4_DISPATCH_TABLE=missing))
    described, pick = json.loads(r.stdout.splitlines()[-1])
    assert pick == "triton" and described["from_env"] and not described["exists"]
    assert f"MINICPM_INT4_DISPATCH_TABLE={missing}: no such file" in r.stderr


def test_a_cuda_extension_built_from_an_older_checkout_is_refused_by_name(monkeypatch):
    """An editable install keeps the _C it built until it is reinstalled: one whose w4a16_gemm has no
    input_perm (built before the kernels read x through an act-order layer's channel order) would take
    the order as another argument, so ops._cuda_ext refuses it and says to rebuild; a current one loads.
    The extension is stood in for by a registered schema (no CUDA kernel is called)."""
    import sys
    import types

    import torch

    from minicpm_int4 import ops

    if ops.cuda_extension_error() is None:
        pytest.skip("the real extension is loaded in this process: its namespace cannot be stood in for")
    monkeypatch.setitem(sys.modules, "minicpm_int4._C", types.ModuleType("minicpm_int4._C"))
    head = "w4a16_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, int group_size, int variant=0, "
    for tail, loads in (("Tensor? input_scale=None) -> Tensor", False),
                        ("Tensor? input_scale=None, Tensor? input_perm=None) -> Tensor", True)):
        lib = torch.library.Library("minicpm_int4_C", "DEF")
        try:
            lib.define(head + tail)
            ops._cuda_ext.cache_clear()
            ext, why = ops._cuda_ext()
            if loads:
                assert why is None and ext is torch.ops.minicpm_int4_C
            else:
                assert ext is None and "older checkout" in why and "without input_perm" in why and "rebuild" in why
        finally:
            lib._destroy()
            ops._cuda_ext.cache_clear()


def test_auto_asks_the_quantizer_rule_with_m_and_k(monkeypatch):
    """resolve_backend("auto") on CUDA asks dispatch.py's quantizer rule for quantize_per_token_int8 with the
    call's (M, K), and the W4A16 rule with (M, N, K); what the quantizer rule names is taken ("cuda" only
    where the extension is built: the rule is told)."""
    import torch

    from minicpm_int4 import dispatch, ops

    asked = []
    monkeypatch.setattr(dispatch, "act_quant_auto_backend",
                        lambda m, k, dev, ext: asked.append(("aq", m, k, ext)) or "cuda")
    monkeypatch.setattr(dispatch, "w4a16_auto_backend",
                        lambda m, n, k, dev, ext: asked.append(("w4a16", m, n, k)) or "triton")
    monkeypatch.setattr(ops, "_cuda_ext", lambda: (object(), None))
    cuda = torch.device("cuda", 0)
    assert ops.resolve_backend("auto", cuda, "quantize_per_token_int8", shape=(4096, 14336)) == "cuda"
    assert ops.resolve_backend("auto", cuda, "w4a16_gemm", shape=(4096, 1024, 4096)) in ("triton", "torch")
    assert asked == [("aq", 4096, 14336, True), ("w4a16", 4096, 1024, 4096)]
    # W4A8: (M, N, K, group size), and whether the CUDA kernel could run it (an extension with the op, a
    # layer it takes: K % 16 == 0, a group size that is a multiple of 32 or K)
    monkeypatch.setattr(dispatch, "w4a8_auto_backend",
                        lambda m, n, k, g, dev, ext, **kw: asked.append(("w4a8", m, n, k, g, ext)) or ("cuda" if ext else "triton"))

    class Ext:
        w4a8_gemm = object()

    monkeypatch.setattr(ops, "_cuda_ext", lambda: (Ext(), None))
    assert ops.resolve_backend("auto", cuda, "w4a8_gemm", shape=(4096, 1024, 4096, 128)) == "cuda"
    assert ops.resolve_backend("auto", cuda, "w4a8_gemm", shape=(4096, 1024, 4300, 4300)) in ("triton", "torch")
    monkeypatch.setattr(ops, "_cuda_ext", lambda: (object(), None))  # built before the W4A8 kernel
    assert ops.resolve_backend("auto", cuda, "w4a8_gemm", shape=(4096, 1024, 4096, 128)) in ("triton", "torch")
    assert asked[2:] == [("w4a8", 4096, 1024, 4096, 128, True), ("w4a8", 4096, 1024, 4300, 4300, False),
                         ("w4a8", 4096, 1024, 4096, 128, False)]


def test_dispatch_table_command_writes_a_users_table_and_refuses_what_is_not_one(tmp_path, capsys):
    """`minicpm-int4 dispatch-table BENCH --out PATH` (a GPU the package has not measured): the table from a bench
    result, added to one already at PATH (other GPUs kept, this GPU's entry replaced), with the variable to set;
    --out is required (the package's own table is benchmarks/make_dispatch_table.py's default); a missing file, a
    JSON that is no bench result, a bench timed on the CPU and an --out that is no table are refused by name."""
    from minicpm_int4.cli import main

    def bench_file(name, device_name, winner_ms, device="cuda:0"):
        b = _bench(device_name, [{"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-triton", "median_ms": 0.010},
                                 {"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-cuda", "median_ms": winner_ms}])
        b["env"].update(device=device, capability="8.9", sm_count=142)
        path = tmp_path / name
        path.write_text(json.dumps(b))
        return str(path)

    out = tmp_path / "tables" / "mine.json"
    assert main(["dispatch-table", bench_file("a.json", "NVIDIA L40S", 0.008), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: on NVIDIA L40S" in printed and "fastest: cuda 1 (of 1 entries)" in printed
    assert f"MINICPM_INT4_DISPATCH_TABLE={out}" in printed
    entry = json.loads(out.read_text())["devices"]["NVIDIA L40S"]
    assert entry["capability"] == "8.9" and [r["backend"] for r in entry["w4a16"]] == ["cuda"]
    assert main(["dispatch-table", bench_file("b.json", "NVIDIA A100", 0.008), "--out", str(out)]) == 0
    assert main(["dispatch-table", bench_file("c.json", "NVIDIA L40S", 0.020), "--out", str(out)]) == 0
    devices = json.loads(out.read_text())["devices"]
    assert sorted(devices) == ["NVIDIA A100", "NVIDIA L40S"]
    assert [r["backend"] for r in devices["NVIDIA L40S"]["w4a16"]] == ["triton"]  # the new run's, not the old
    assert w4a16_auto_backend(1, 4096, 4096, 0, True, str(out), "NVIDIA A100") == "cuda"
    capsys.readouterr()

    with pytest.raises(SystemExit) as e:  # argparse: --out is required
        main(["dispatch-table", bench_file("d.json", "GPU", 0.008)])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
    refusals = {
        str(tmp_path / "missing.json"): "no such file",
        str(tmp_path / "notjson.json"): "is not JSON",
        str(tmp_path / "profile.json"): "is not a `minicpm-int4 bench` result",
        bench_file("cpu.json", "cpu", 0.008, device="cpu"): "was timed on cpu, not a GPU",
    }
    (tmp_path / "notjson.json").write_text("{")
    (tmp_path / "profile.json").write_text(json.dumps({"kind": "profile", "runs": [], "env": {"device_name": "x"}}))
    for path, words in refusals.items():
        with pytest.raises(SystemExit) as e:
            main(["dispatch-table", path, "--out", str(tmp_path / "t.json")])
        assert words in str(e.value), (path, e.value)
    assert not (tmp_path / "t.json").exists()
    notes = tmp_path / "notes.json"
    notes.write_text("[1, 2]")
    with pytest.raises(SystemExit) as e:
        main(["dispatch-table", bench_file("e.json", "GPU", 0.008), "--out", str(notes)])
    assert "exists and is not a dispatch table" in str(e.value) and notes.read_text() == "[1, 2]"
