"""`minicpm-int4 targets`: the issues' performance targets read off a results folder (bench/targets.py),
on synthetic results whose verdicts are known."""
import json

import pytest

from minicpm_int4.bench.targets import check_targets, targets_markdown
from minicpm_int4.cli import main

BW = 4000.0  # GB/s


def _row(model, n, k, m, backend, ms, fp_ms=None, pct=None, check="ok"):
    return {"model": model, "n": n, "k": k, "m": m, "backend": backend, "median_ms": ms, "check": check,
            "family": "fp16" if backend == "fp16" else "ours", "p20_ms": ms, "p80_ms": ms, "gbps": 1.0, "bytes": 1,
            "pct_copy_bw": pct if pct is not None else 50.0, "speedup_vs_fp16": (fp_ms / ms) if fp_ms else None}


def _bench():
    rows = []
    for model, n, k in [("minicpmv4.6", 4096, 4096), ("minicpmv4.6", 768, 3072), ("llama3-v2.5", 14336, 4096)]:
        fp1, fp16, fp4096 = 0.040, 0.042, 1.0
        rows += [_row(model, n, k, 1, "fp16", fp1, fp1), _row(model, n, k, 16, "fp16", fp16, fp16),
                 _row(model, n, k, 4096, "fp16", fp4096, fp4096)]
        # GEMV at 80% of bandwidth, the tensor-core kernel at 88%: the faster one counts
        rows += [_row(model, n, k, 1, "w4a16-triton", 0.0110, fp1, pct=80.0),
                 _row(model, n, k, 1, "w4a16-triton-tc", 0.0100, fp1, pct=88.0),
                 _row(model, n, k, 16, "w4a16-triton", 0.0130, fp16),            # 3.23x
                 _row(model, n, k, 4096, "w4a16-triton", 1.05, fp4096),          # 0.95x
                 _row(model, n, k, 4096, "w4a8-triton", 0.70, fp4096),           # 1.43x: below 1.5
                 _row(model, n, k, 1, "w4a16-cuda", 0.0095, fp1, pct=92.0)]
    # a vision-sized shape that fails the bandwidth target must not count (not a large shape)
    rows = [r if not (r["n"] == 768 and r["backend"] == "w4a16-triton-tc") else dict(r, pct_copy_bw=10.0) for r in rows]
    return {"env": {"device_name": "GPU-X", "commit": "abc", "timestamp_utc": "t", "torch": "2.11", "triton": "3.6"},
            "copy_bandwidth_gbps": BW, "skipped": {"gemlite": "not installed"}, "rows": rows,
            "act_quant": [{"m": 4096, "k": 4096, "backend": "triton", "pct_copy_bw": 72.0},
                          {"m": 4096, "k": 4096, "backend": "cuda", "pct_copy_bw": 20.0}]}


def _by_what(targets, start):
    return next(t for t in targets if t.what.startswith(start))


def test_verdicts_on_known_numbers():
    ts = check_targets(_bench())
    m1 = _by_what(ts, "W4A16 Triton, M = 1")
    assert m1.verdict == "met" and m1.worst == pytest.approx(88.0) and len(m1.per_shape) == 2  # large shapes only
    assert _by_what(ts, "W4A16 Triton, M = 16").verdict == "met"
    assert _by_what(ts, "W4A16 Triton, M = 4096").worst == pytest.approx(1 / 1.05)
    w4a8 = _by_what(ts, "W4A8 (with")
    assert w4a8.verdict == "not met" and len(w4a8.per_shape) == 2  # MiniCPM-V 4.6 shapes, vision included
    assert _by_what(ts, "W4A8 over W4A16").verdict == "met"
    assert _by_what(ts, "activation quantization").per_shape == [("4096 x 4096", 72.0)]
    assert not any("warps-a-row" in t.what for t in ts)  # no variant rows: no line
    bench = _bench()
    bench["act_quant"] += [{"m": 4096, "k": 4096, "backend": "triton-16w", "pct_copy_bw": 81.0},
                           {"m": 4096, "k": 4096, "backend": "triton-4w", "pct_copy_bw": 99.0, "check": "mismatch"}]
    aq_auto = _by_what(check_targets(bench), "activation quantization (Triton as backend='auto'")
    assert aq_auto.per_shape == [("4096 x 4096", 81.0)] and aq_auto.verdict == "met"
    assert _by_what(ts, "CUDA extension, M = 1").verdict == "met"
    assert _by_what(ts, "CUDA extension over").worst == pytest.approx(0.0100 / 0.0095)
    assert not any(t.what.startswith("W4A16 as backend='auto'") for t in ts)  # no dequant + matmul rows: no line
    bench = _bench()  # dequantization + matmul faster on one large shape: "auto" takes the faster per shape
    bench["rows"].append(_row("llama3-v2.5", 14336, 4096, 4096, "w4a16-triton-dq", 0.8, 1.0))
    auto = _by_what(check_targets(bench), "W4A16 as backend='auto'")
    assert auto.per_shape == [("minicpmv4.6 4096 x 4096", pytest.approx(1 / 1.05)),
                              ("llama3-v2.5 14336 x 4096", pytest.approx(1 / 0.8))]
    assert auto.verdict == "met" and _by_what(check_targets(bench), "W4A16 Triton, M = 4096").verdict == "met"


def test_w4a8_cuda_rows_give_the_faster_w4a8_path_its_own_lines():
    ts = check_targets(_bench())
    assert not any("faster of Triton and the CUDA kernel" in t.what for t in ts)  # no w4a8-cuda rows: no line
    bench = _bench()
    fp = 1.0
    bench["rows"] += [_row("minicpmv4.6", 4096, 4096, 4096, "w4a8-cuda", 0.60, fp),   # 1.67x, beats Triton's 0.70
                      _row("minicpmv4.6", 768, 3072, 4096, "w4a8-cuda", 0.90, fp),    # slower than Triton's: 0.70 counts
                      _row("minicpmv4.6", 4096, 4096, 4096, "w4a16-triton-dq", 0.65, fp)]
    ts = check_targets(bench)
    best = _by_what(ts, "W4A8, the faster of Triton and the CUDA kernel")
    assert best.per_shape == [("minicpmv4.6 4096 x 4096", pytest.approx(1 / 0.60)),
                              ("minicpmv4.6 768 x 3072", pytest.approx(1 / 0.70))]
    assert best.verdict == "not met"  # the vision shape's 1.43x
    over = _by_what(ts, "W4A8 (faster of Triton / CUDA) over W4A16")
    # 4096 x 4096: W4A16's faster is dequant + matmul (0.65) against W4A8's 0.60; 768 x 3072: 1.05 against 0.70
    assert over.per_shape == [("minicpmv4.6 4096 x 4096", pytest.approx(0.65 / 0.60)),
                              ("minicpmv4.6 768 x 3072", pytest.approx(1.05 / 0.70))]
    assert over.verdict == "met"
    from minicpm_int4.bench.targets import variant_lines

    # Triton time over CUDA time: 0.70 / 0.60 and 0.70 / 0.90, the median of both, the large shape alone
    assert "| w4a8-cuda | w4a8-triton | 4096 | 0.97x (0.78 - 1.17, 2) | 1.17x (1.17 - 1.17, 1) |" in variant_lines(bench)
    # a W4A8 variant "auto" can take counts; the fused epilogue's rows (no candidate: not the reference's bits) do not
    bench["rows"] += [_row("minicpmv4.6", 768, 3072, 4096, "w4a8-cuda-t128", 0.50, fp),
                      _row("minicpmv4.6", 4096, 4096, 4096, "w4a8-cuda-fma", 0.10, fp)]
    best = _by_what(check_targets(bench), "W4A8, the faster of Triton and the CUDA kernel")
    assert [v for _, v in best.per_shape] == [pytest.approx(1 / 0.60), pytest.approx(1 / 0.50)]


def test_cuda_ring_rows_give_the_auto_cuda_bandwidth_line():
    ts = check_targets(_bench())
    assert not any(t.what.startswith("CUDA extension as backend='auto'") for t in ts)  # no ring rows: no line
    bench = _bench()
    fp = 0.040
    bench["rows"] += [_row("minicpmv4.6", 4096, 4096, 1, "w4a16-cuda-ring", 0.0080, fp, pct=95.0),  # beats 92%
                      _row("llama3-v2.5", 14336, 4096, 1, "w4a16-cuda-ring", 0.0120, fp, pct=70.0)]  # 92% counts
    auto = _by_what(check_targets(bench), "CUDA extension as backend='auto'")
    assert auto.per_shape == [("minicpmv4.6 4096 x 4096", pytest.approx(95.0)),
                              ("llama3-v2.5 14336 x 4096", pytest.approx(92.0))]
    assert auto.verdict == "met"
    assert _by_what(check_targets(bench), "CUDA extension, M = 1").per_shape[0][1] == pytest.approx(92.0)


def test_triton_variant_rows_give_the_auto_triton_lines():
    # where the bench timed the Triton variants that backend="auto" can take (dispatch.TRITON_CANDIDATES), the
    # targets get a line each with the fastest per shape; without such rows, no line
    ts = check_targets(_bench())
    assert not any(t.what.startswith("W4A16 Triton as backend='auto'") or "faster tile order" in t.what for t in ts)
    bench = _bench()
    big, llama = ("minicpmv4.6", 4096, 4096), ("llama3-v2.5", 14336, 4096)
    bench["rows"] += [_row(*big, 1, "w4a16-triton-prefetch", 0.0090, 0.040, pct=97.0),   # beats the tc kernel's 88%
                      _row(*llama, 1, "w4a16-triton-unsplit", 0.0200, 0.040, pct=40.0),  # slower: 88% counts
                      _row(*big, 16, "w4a16-triton-trip32", 0.0120, 0.042),            # 3.5x over 3.23x
                      _row(*llama, 16, "w4a16-triton-trip32", 0.0140, 0.042),          # slower: 3.23x counts
                      _row(*big, 4096, "w4a16-triton-rhs", 1.20, 1.0),                 # slower: 0.95x counts
                      _row(*llama, 4096, "w4a16-triton-rhs", 1.00, 1.0),               # 1.0x
                      _row(*llama, 4096, "w4a16-triton-dq", 0.90, 1.0)]
    ts = check_targets(bench)
    m1 = _by_what(ts, "W4A16 Triton as backend='auto' takes it (the fastest of the GEMV")
    assert m1.per_shape == [("minicpmv4.6 4096 x 4096", 97.0), ("llama3-v2.5 14336 x 4096", 88.0)]
    assert m1.verdict == "met"
    m16 = _by_what(ts, "W4A16 Triton as backend='auto' takes it (the faster of the decode")
    assert [v for _, v in m16.per_shape] == [pytest.approx(0.042 / 0.012), pytest.approx(0.042 / 0.013)]
    rhs = _by_what(ts, "W4A16 Triton fused prefill kernel, the faster tile order")
    assert [v for _, v in rhs.per_shape] == [pytest.approx(1 / 1.05), pytest.approx(1.0)]
    auto = _by_what(ts, "W4A16 as backend='auto' takes it")
    assert [v for _, v in auto.per_shape] == [pytest.approx(1 / 1.05), pytest.approx(1 / 0.9)]
    assert _by_what(ts, "W4A16 Triton, M = 4096").per_shape == rhs.per_shape[:1] + [
        ("llama3-v2.5 14336 x 4096", pytest.approx(1 / 1.05))]  # the defaults' own line is unchanged


def test_unmeasured_and_equal_are_not_met():
    bench = _bench()
    bench["rows"] = [r for r in bench["rows"] if r["backend"] != "w4a16-cuda"]      # extension not built
    bench["rows"] = [dict(r, check="mismatch") if r["backend"] == "w4a8-triton" else r for r in bench["rows"]]
    ts = check_targets(bench)
    assert _by_what(ts, "CUDA extension, M = 1").verdict == "not measured"
    assert _by_what(ts, "W4A8 (with").verdict == "not measured"     # a row that failed its check is no result
    bench = _bench()
    bench["rows"] = [dict(r, median_ms=0.0100) if r["backend"] == "w4a16-cuda" else r for r in bench["rows"]]
    assert _by_what(check_targets(bench), "CUDA extension over").verdict == "not met"  # as fast is not faster


def test_cli_writes_targets_md(tmp_path, capsys):
    (tmp_path / "bench.json").write_text(json.dumps(_bench()))
    profile = {"runs": [
        {"model": "llama3-v2.5", "weights": "float16", "mode": "graphed", "tokens_per_s": 50.0, "peak_bytes": 2**30,
         "weight_bytes": 2**30},
        {"model": "llama3-v2.5", "weights": "int4", "mode": "graphed", "tokens_per_s": 120.0, "peak_bytes": 2**29,
         "weight_bytes": 2**28},
        {"model": "llama3-v2.5", "weights": "int4", "mode": "eager", "error": "RuntimeError: x"},
    ]}
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    assert main(["targets", str(tmp_path)]) == 0
    text = (tmp_path / "targets.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "| #3 | W4A16 Triton, M = 1" in text and "| not met |" in text and "`gemlite` skipped" in text
    assert "| llama3-v2.5 | graphed | 50.0 | 120.0 | 2.40x | 1024 | 512 | 1024 | 256 |" in text
    assert "| llama3-v2.5 | eager | - | failed |" in text
    assert "targets" in targets_markdown(_bench()).lower()


def test_cli_names_a_missing_bench_json(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["targets", str(tmp_path)])
    assert "bench.json does not exist" in capsys.readouterr().err


def test_ingest_takes_a_suite_folder_into_the_repository(tmp_path):
    """benchmarks/ingest_gpu_results.py: a suite's output -> results/<gpu>/, README, dispatch table
    and targets.md, with warnings for what is incomplete; CPU results are refused."""
    from minicpm_int4.bench.ingest import device_slug, ingest
    from minicpm_int4.bench.readme import END, START

    src, root = tmp_path / "out", tmp_path / "repo"
    src.mkdir()
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "README.md").write_text(f"# x\n\n{START}\nnothing yet\n{END}\n")
    bench = _bench()
    bench["env"].update(device="cuda:0", device_name="NVIDIA H200")
    bench["config"] = {"ms": [1, 16, 4096], "group_size": 128, "dtype": "float16", "rep_ms": 30}
    bench["errors"] = [{"backend": "bnb-nf4", "n": 1, "k": 2, "family": "peer", "error": "boom"}]
    bench["incomplete"] = "time budget of 130 s reached before lm_head"
    (src / "bench.json").write_text(json.dumps(bench))
    (src / "suite.log").write_text("=== [env] rc=0\n")
    table = tmp_path / "dispatch_table.json"
    table.write_text(json.dumps({"devices": {"Other GPU": {"w4a16": []}}}))

    rep = ingest(str(src), str(root), dispatch_table=str(table))
    dest = root / "benchmarks" / "results" / "nvidia-h200"
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert rep["folder"] == str(dest) and rep["copied"] == ["suite.log", "bench.json"]
    assert "profile.json" in rep["missing"]
    assert any("incomplete" in w for w in rep["warnings"]) and any("bnb-nf4" in w for w in rep["warnings"])
    assert (dest / "bench.json").exists() and "W4A16 Triton, M = 1" in (dest / "targets.md").read_text()
    assert rep["readme_changed"] and "nothing yet" not in (root / "README.md").read_text()
    devices = json.loads(table.read_text())["devices"]
    assert set(devices) == {"Other GPU", "NVIDIA H200"}  # other GPUs' entries kept

    # a second, profile-only call: its profile joins the bench already there, whose suite.log and dispatch
    # table stay; targets.md is made again from both
    src2 = tmp_path / "out2"
    src2.mkdir()
    profile = {"env": dict(bench["env"]), "config": {"prompt_tokens": 512, "new_tokens": 128, "images": 1},
               "runs": [{"model": "llama3-v2.5", "weights": "float16", "mode": "cudagraph", "tokens_per_s": 50.0},
                        {"model": "llama3-v2.5", "weights": "int4", "mode": "cudagraph", "tokens_per_s": 120.0}]}
    (src2 / "profile.json").write_text(json.dumps(profile))
    (src2 / "suite.log").write_text("=== [profile] rc=0\n")
    (src2 / "decode_sweep.md").write_text("## Decode sweep\n")  # the call's extra stage ran the decode sweep
    table_before = table.read_text()
    rep2 = ingest(str(src2), str(root), dispatch_table=str(table))
    assert rep2["copied"] == ["suite.log", "profile.json", "decode_sweep.md"] and table.read_text() == table_before
    assert (dest / "decode_sweep.md").exists() and "decode_sweep.json" not in rep2["missing"]
    assert (dest / "suite.log").read_text() == "=== [env] rc=0\n"
    assert (dest / "suite.profile.log").read_text() == "=== [profile] rc=0\n"
    text = (dest / "targets.md").read_text()
    assert "W4A16 Triton, M = 1" in text and "| llama3-v2.5 | cudagraph | 50.0 | 120.0 | 2.40x" in text

    # and a bench-only call after it (the profile run first): targets.md keeps the profile in the folder, and says so
    src3 = tmp_path / "out3"
    src3.mkdir()
    (src3 / "bench.json").write_text(json.dumps(dict(bench, incomplete=None, errors=[])))
    (src3 / "suite.log").write_text("=== [bench] rc=0\n")
    (src3 / "counters.json").write_text("{}")  # the call's opt-in counters stage ran (benchmarks/ncu_counters.py)
    (src3 / "counters.md").write_text("## Hardware counters\n")
    rep3 = ingest(str(src3), str(root), dispatch_table=str(table))
    assert rep3["copied"] == ["suite.log", "bench.json", "counters.json", "counters.md"] and (dest / "profile.json").exists()
    assert (dest / "counters.md").read_text() == "## Hardware counters\n" == rep3["counters"]
    assert any("end-to-end rows come from the profile.json already in" in w for w in rep3["warnings"])
    text = (dest / "targets.md").read_text()
    assert "W4A16 Triton, M = 1" in text and "| llama3-v2.5 | cudagraph | 50.0 | 120.0 | 2.40x" in text

    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "bench.json").write_text(json.dumps(dict(bench, env=dict(bench["env"], device="cpu", device_name="cpu"))))
    with pytest.raises(ValueError, match="not measured on a GPU"):
        ingest(str(cpu), str(root), dispatch_table=str(table))
    with pytest.raises(FileNotFoundError, match="neither bench.json nor profile.json"):
        ingest(str(tmp_path / "repo"), str(root), dispatch_table=str(table))


def test_ingest_script_takes_a_new_gpu_and_says_what_to_commit(tmp_path, capsys):
    """benchmarks/ingest_gpu_results.py's main, as a GPU session runs it first: a GPU with no results yet (an H100
    beside the committed H200) gets a folder and a dispatch entry of its own; the other GPU's are kept; what is
    incomplete is printed, and the git command to commit it."""
    from minicpm_int4.bench.ingest import main as ingest_main
    from minicpm_int4.bench.readme import END, START

    src, root = tmp_path / "out", tmp_path / "repo"
    src.mkdir()
    (root / "benchmarks" / "results" / "nvidia-h200").mkdir(parents=True)
    (root / "minicpm_int4").mkdir()
    (root / "minicpm_int4" / "dispatch_table.json").write_text(json.dumps({"devices": {"NVIDIA H200": {"w4a16": []}}}))
    (root / "README.md").write_text(f"# x\n\n{START}\nnothing yet\n{END}\n")
    bench = _bench()
    bench["env"].update(device="cuda:0", device_name="NVIDIA H100 80GB HBM3", commit="abc")
    bench["config"] = {"ms": [1, 16, 4096], "group_size": 128, "dtype": "float16", "rep_ms": 30}
    bench["incomplete"] = "time budget of 130 s reached before lm_head"
    (src / "bench.json").write_text(json.dumps(bench))
    (src / "suite.log").write_text("=== [bench] rc=0\n")
    assert ingest_main([str(src), "--root", str(root)]) == 0
    out = capsys.readouterr().out
    dest = root / "benchmarks" / "results" / "nvidia-h100-80gb-hbm3"
    assert f"NVIDIA H100 80GB HBM3: copied suite.log, bench.json to {dest}" in out
    assert "warning: bench.json is marked incomplete: time budget of 130 s reached before lm_head" in out
    assert "README.md performance section regenerated" in out and "W4A16 Triton, M = 1" in out
    assert ("next: git add benchmarks/results/nvidia-h100-80gb-hbm3 README.md minicpm_int4/dispatch_table.json "
            "&& git commit") in out
    devices = json.loads((root / "minicpm_int4" / "dispatch_table.json").read_text())["devices"]
    assert set(devices) == {"NVIDIA H200", "NVIDIA H100 80GB HBM3"}
    assert "### NVIDIA H100 80GB HBM3" in (root / "README.md").read_text()


def _streaming_bench(floors_us, gbps, eager_backend=None):
    """Rows whose times are exactly floor + bytes / bandwidth per backend (M = 1), over shapes of 1 - 32 MB,
    plus fp16 at four times the bytes."""
    rows = []
    for n in (512, 1024, 2048, 4096, 8192, 16384):
        k = 4096
        int4_bytes = n * k // 2 + n * (k // 128) * 4
        for backend, floor in floors_us.items():
            nbytes = n * k * 2 if backend == "fp16" else int4_bytes
            ms = (floor + nbytes / 1e6 / gbps[backend] * 1e3) / 1e3
            r = _row("m", n, k, 1, backend, ms, pct=1.0, check="unchecked" if backend == "fp16" else "ok")
            r["bytes"] = nbytes
            if backend == eager_backend:
                r["timing"] = "eager (graph capture failed: X)"
            rows.append(r)
    return {"rows": rows, "copy_bandwidth_gbps": 4000.0, "env": {}}


def test_stream_fit_recovers_floor_and_bandwidth_and_bounds_the_per_shape_percentage():
    from minicpm_int4.bench.targets import TRITON_BEST, ceiling_fraction, stream_fit_lines, stream_fits

    floors = {"fp16": 3.0, "w4a16-triton": 4.0, "w4a16-triton-tc": 2.0, "w4a16-cuda": 2.5}
    gbps = {"fp16": 4000.0, "w4a16-triton": 2000.0, "w4a16-triton-tc": 1000.0, "w4a16-cuda": 3000.0}
    fits = {(f.backend, f.m): f for f in stream_fits(_streaming_bench(floors, gbps))}
    for b in floors:
        assert fits[(b, 1)].floor_us == pytest.approx(floors[b], rel=1e-6)
        assert fits[(b, 1)].gbps == pytest.approx(gbps[b], rel=1e-6)
        assert fits[(b, 1)].r2 == pytest.approx(1.0) and fits[(b, 1)].shapes == 6
    # the faster Triton kernel per shape: the tensor-core one on small shapes, the GEMV on large ones, so
    # the combined series is no line; its fit lies between the two
    best = fits[(TRITON_BEST, 1)]
    assert best.shapes == 6 and best.r2 < 1.0 and 1000.0 < best.gbps < 2000.0 + 1e-6
    # the bound: 8 MB at 4 GB/ms = 2 us of streaming beside a 3 us floor shows 40%
    assert ceiling_fraction(8.0, 3.0, 4000.0) == pytest.approx(0.4)
    text = "\n".join(stream_fit_lines(_streaming_bench(floors, gbps)))
    assert "| w4a16-cuda | 1 | 2.50 | 3000 | 75% | 1.000 | 6 |" in text
    assert "fp16's floor at M = 1 is 3.00 us" in text and "no kernel reaches them" in text


def test_stream_fit_leaves_out_eager_rows_and_needs_spread_sizes():
    from minicpm_int4.bench.targets import stream_fit_lines, stream_fits

    floors = {"fp16": 3.0, "w4a16-cuda": 2.5}
    gbps = {"fp16": 4000.0, "w4a16-cuda": 3000.0}
    fits = stream_fits(_streaming_bench(floors, gbps, eager_backend="w4a16-cuda"))
    assert [f.backend for f in fits] == ["fp16"]  # eager timings hold the host's launch, not a floor
    bench = _streaming_bench(floors, gbps)
    bench["rows"] = [r for r in bench["rows"] if r["n"] in (4096, 8192, 16384)]  # 3 sizes: too few
    assert stream_fits(bench) == [] and "No fit" in stream_fit_lines(bench)[0]
    bench = _streaming_bench(floors, gbps)
    bench["rows"] = [dict(r, check="mismatch") if r["backend"] == "w4a16-cuda" else r for r in bench["rows"]]
    assert [f.backend for f in stream_fits(bench)] == ["fp16"]  # a row that failed its check is no time


def test_act_quant_variant_lines_compare_4_warps_a_row_with_the_default():
    from minicpm_int4.bench.targets import act_quant_variant_lines

    bench = _bench()
    assert act_quant_variant_lines(bench) == []  # no variant rows: no table
    bench["act_quant"] += [
        {"m": 4096, "k": 4096, "backend": "triton", "pct_copy_bw": 65.0, "median_ms": 0.0184},
        {"m": 4096, "k": 4096, "backend": "triton-4w", "pct_copy_bw": 71.5, "median_ms": 0.0167},
        {"m": 4096, "k": 14336, "backend": "triton", "pct_copy_bw": 29.4, "median_ms": 0.1422},
        {"m": 4096, "k": 14336, "backend": "triton-4w", "pct_copy_bw": 50.0, "median_ms": 0.0836, "check": "mismatch"},
        {"m": 4096, "k": 14336, "backend": "triton-16w", "pct_copy_bw": 58.8, "median_ms": 0.0711}]
    text = "\n".join(act_quant_variant_lines(bench))
    assert "| 4096 | 4 warps a row (`triton-4w`) | 65.0% | 71.5% | 1.10x |" in text
    assert "| 14336 | 16 warps a row (`triton-16w`) | 29.4% | 58.8% | 2.00x |" in text
    assert "| 14336 | 4 warps" not in text  # a failed check is no time
    assert "4 warps a row" in targets_markdown(bench)


def test_variant_lines_compare_each_measurement_variant_with_its_default():
    from minicpm_int4.bench.targets import variant_lines

    bench = _bench()
    for model, n, k in [("minicpmv4.6", 4096, 4096), ("minicpmv4.6", 768, 3072), ("llama3-v2.5", 14336, 4096)]:
        # prefetch 10% faster than the GEMV everywhere; ahead2 slower than the CUDA kernel on the small shape
        bench["rows"].append(_row(model, n, k, 1, "w4a16-triton-prefetch", 0.0100))
        bench["rows"].append(_row(model, n, k, 1, "w4a16-cuda-ahead2", 0.0095 / (0.5 if n == 768 else 1.25)))
        # the prefill as dequantization + matmul: twice the fused kernel's speed at M = 4096
        bench["rows"].append(_row(model, n, k, 4096, "w4a16-triton-dq", 1.05 / 2))
    text = "\n".join(variant_lines(bench))
    assert "| w4a16-triton-prefetch | w4a16-triton | 1 | 1.10x (1.10 - 1.10, 3) | 1.10x (1.10 - 1.10, 2) |" in text
    assert "| w4a16-cuda-ahead2 | w4a16-cuda | 1 | 1.25x (0.50 - 1.25, 3) | 1.25x (1.25 - 1.25, 2) |" in text
    assert "| w4a16-triton-dq | w4a16-triton | 4096 | 2.00x (2.00 - 2.00, 3) | 2.00x (2.00 - 2.00, 2) |" in text
    assert "| w4a16-triton-tc | w4a16-triton | 1 | 1.10x" in text and "unsplit" not in text  # no rows: no line
    assert "| w4a16-triton-dq | w4a16-triton | 1024 |" not in text
    assert variant_lines({"rows": []}) == []
    assert "Measurement variants" in targets_markdown(bench)
