"""The measuring harness itself, on CPU and tiny shapes: schema, writers, skipped peers, checks."""
import json
import os
import re
import subprocess
import types

import pytest
import torch

from minicpm_int4 import ops
from minicpm_int4.bench import backends as B
from minicpm_int4.bench.micro import KernelMismatch, run_microbench
from minicpm_int4.bench.report import validate_micro, write_all
from minicpm_int4.bench.shapes import LinearShape, all_shapes
from minicpm_int4.cli import main

TINY = [LinearShape("tiny", 96, 256, ["a"]), LinearShape("tiny", 64, 128, ["b"])]


def _cpu_backends():
    return [B.Fp16Matmul(), B.OursW4A16("torch"), B.OursW4A8("torch"), B.TorchTinyGemm(),
            B.BitsandbytesNF4(), B.Gemlite(), B.OursW4A16("cuda", max_m=16)]


def test_microbench_schema_writers_and_skips(tmp_path):
    res = run_microbench(TINY, ms=[1, 17], backends=_cpu_backends(), device=torch.device("cpu"),
                         dtype=torch.bfloat16, group_size=64, rep_ms=2, progress=False, copy_bw_gbps=50.0)
    assert validate_micro(res) is None
    # missing peers and unusable backends are reported with a reason, not a crash
    assert "bnb-nf4" in res["skipped"] and "gemlite" in res["skipped"] and "w4a16-cuda" in res["skipped"]
    names = {r["backend"] for r in res["rows"]}
    # torch's CPU tinygemm ops came after torch 2.4 (the oldest torch pyproject.toml takes): skipped there, named
    tinygemm = B.TorchTinyGemm().available(torch.device("cpu"))
    assert (tinygemm is None) == ("torch-tinygemm" not in res["skipped"])
    assert names == {"fp16", "w4a16-torch", "w4a8-torch"} | ({"torch-tinygemm"} if tinygemm is None else set())
    # W4A8 only from ops.W4A8_MIN_M = 17 rows on (a W4A8 layer runs W4A16 below): at M = 17, not 1
    assert len(res["rows"]) == len(TINY) * (2 * len(names) - 1)
    assert {r["m"] for r in res["rows"] if r["backend"] == "w4a8-torch"} == {17}
    for r in res["rows"]:
        assert r["check"] == ("unchecked" if r["backend"] == "fp16" else "ok") and r["median_ms"] > 0 and r["p20_ms"] <= r["p80_ms"]
        assert r["speedup_vs_fp16"] is not None and r["rotating_copies"] >= 2
        assert r["bytes"] > 0 and r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / 50.0)
        assert (r["host_us"] > 0) if r["m"] <= 16 else r["host_us"] is None
        assert r["timing"] == "cpu"  # (on CUDA: "cuda-graph", or "eager (...)" with the reason)
    fp = next(r for r in res["rows"] if r["backend"] == "fp16" and r["m"] == 1 and r["n"] == 96)
    assert fp["bytes"] == 96 * 256 * 2 + 256 * 2 + 96 * 2
    assert res["act_quant"] and all(r["gbps"] > 0 and r["check"] == "ok" for r in res["act_quant"])
    for key in ("device_name", "torch", "triton", "commit", "timestamp_utc"):
        assert key in res["env"]
    assert set(res["env"]["peers"]) == {"bitsandbytes", "gemlite"}

    files = write_all(res, str(tmp_path), "bench")
    assert {os.path.basename(f) for f in files} == {"bench.json", "bench.md", "speedup_vs_m.png", "bandwidth.png"}
    assert validate_micro(json.loads((tmp_path / "bench.json").read_text())) is None
    md = (tmp_path / "bench.md").read_text()
    assert "96 x 256" in md and "bnb-nf4` skipped" in md and "% of copy bandwidth" in md
    assert "host time per call, M = 1" in md and "| w4a16-torch |" in md
    assert "- peers: bitsandbytes " in md and "linear-attention" not in md  # (the model's kernels: profile only)
    assert (tmp_path / "speedup_vs_m.png").read_bytes()[:4] == b"\x89PNG"


def test_a_wrong_kernel_is_caught_before_it_is_timed():
    class Broken(B.OursW4A16):
        def prepare(self, w, group_size):
            p = super().prepare(w, group_size)
            p.run = lambda x: torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)
            return p

    res = run_microbench(TINY[:1], ms=[1], backends=[Broken("torch")], device=torch.device("cpu"),
                         group_size=64, rep_ms=1, progress=False, copy_bw_gbps=1.0)
    assert not res["rows"]  # never timed
    (err,) = res["errors"]
    assert err["backend"] == "w4a16-torch" and err["error"].startswith(KernelMismatch.__name__)
    assert "outside the derived bound" in err["error"]


def test_time_budget_stops_cleanly_and_marks_the_result():
    res = run_microbench(TINY, ms=[1], backends=[B.Fp16Matmul()], device=torch.device("cpu"), group_size=64,
                         rep_ms=1, progress=False, copy_bw_gbps=1.0, time_budget_s=0)
    assert "time budget" in res["incomplete"] and not res["rows"]
    assert validate_micro(res) is None


def test_peers_are_timed_after_fp16_and_ours():
    """A time budget that runs out must cut the peers' rows, not the ones the targets are judged on."""
    class Peer(B.Fp16Matmul):  # a peer that runs everywhere (torch 2.4 has no CPU tinygemm)
        name, family = "some-peer", "peer"

    order = []
    res = run_microbench(TINY, ms=[1], backends=[Peer(), B.Fp16Matmul(), B.OursW4A16("torch")],
                         device=torch.device("cpu"), group_size=64, rep_ms=1, progress=False, copy_bw_gbps=1.0,
                         checkpoint=lambda r: order.append(r["rows"][-1]["backend"]))
    assert order == ["fp16", "w4a16-torch", "fp16", "w4a16-torch", "some-peer", "some-peer"]
    assert len(res["rows"]) == 6


def test_bnb_peer_with_the_real_library():
    """bitsandbytes (the `bench` extra, installed in CI) runs nf4 on CPU too: the peer's calls -
    double-quantized nf4, matmul_4bit at M = 1 (its GEMV) and above - and its byte count, against
    the real library, so an API change shows here rather than as a skipped row on the GPU."""
    pytest.importorskip("bitsandbytes")
    from minicpm_int4.bench.micro import _check

    n, k = 256, 512
    p = B.BitsandbytesNF4().prepare((torch.randn(n, k) * 0.02).half(), 128)
    # 4 bits per weight, one 8-bit absmax per 64 weights, one fp32 scale per 256 absmax
    assert p.weight_bytes == n * k // 2 + n * k // 64 + 4 * (n * k // 64 // 256)
    for m in (1, 5):
        assert _check("bnb-nf4", p, torch.randn(m, k).half()) == "ok"


def _fake_gemlite(monkeypatch, with_hqq=True):
    """gemlite imports only with CUDA (it reads device 0 on import): a stand-in that keeps gemlite
    0.6's contract for `helper.A16W4_HQQ_INT(device, dtype).from_weights(W_q, scales, zeros)`:
    W_q uint8 [N, K], scales / zeros [N, K / G] with G = W_q.numel() // scales.numel(), W = (W_q - z) * s."""
    import sys
    import types

    class A16W4_HQQ_INT:
        def __init__(self, device="cuda:0", dtype=None):
            self.device, self.dtype = device, dtype

        def from_weights(self, W_q, scales, zeros, bias=None):
            assert W_q.dtype == torch.uint8 and int(W_q.max()) <= 15
            n, k = W_q.shape
            g = W_q.numel() // scales.numel()
            assert scales.shape == zeros.shape == (n, k // g) and scales.dtype == zeros.dtype == self.dtype
            w = (W_q.double().view(n, -1, g) - zeros.double()[..., None]) * scales.double()[..., None]
            return lambda x: (x.double() @ w.view(n, k).T).to(x.dtype)

    helper = types.ModuleType("gemlite.helper")
    if with_hqq:
        helper.A16W4_HQQ_INT = A16W4_HQQ_INT
    pkg = types.ModuleType("gemlite")
    pkg.__version__, pkg.helper = "0.6.0" if with_hqq else "0.4.0", helper
    monkeypatch.setitem(sys.modules, "gemlite", pkg)
    monkeypatch.setitem(sys.modules, "gemlite.helper", helper)


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_gemlite_peer_gets_our_weights_in_hqq_convention(monkeypatch, group_size):
    from minicpm_int4.bench.micro import _check

    _fake_gemlite(monkeypatch)
    peer = B.Gemlite()
    assert peer.available(torch.device("cuda")) is None
    assert "needs CUDA" in peer.available(torch.device("cpu"))
    w = (torch.randn(96, 256) * 0.02).half()
    p = peer.prepare(w, group_size)
    x = torch.randn(5, 256).half()
    assert _check("gemlite", p, x) == "ok"
    # the same weights as reference.py's: the outputs agree to fp16 rounding, not to quantization error
    y, y_ref = p.run(x).float(), p.reference(x).float()
    assert ((y - y_ref).norm() / y_ref.norm()).item() < 2e-3
    assert p.weight_bytes == 96 * 256 // 2 + 2 * 96 * (1 if group_size == -1 else 256 // group_size) * 2


def test_an_old_gemlite_is_skipped_with_the_reason(monkeypatch):
    _fake_gemlite(monkeypatch, with_hqq=False)
    why = B.Gemlite().available(torch.device("cuda"))
    assert "gemlite 0.4.0 has no helper.A16W4_HQQ_INT" in why


def test_shapes_come_from_the_real_configs():
    shapes = {(s.model, s.n, s.k) for s in all_shapes()}
    assert ("minicpmv4.6", 12288, 4096) in shapes and ("minicpmv4.6", 3072, 768) in shapes
    assert ("llama3-v2.5", 14336, 4096) in shapes and ("llama3-v2.5", 1024, 4096) in shapes
    assert ("minicpmv2.6", 18944, 3584) in shapes and ("minicpmv2.6", 512, 3584) in shapes
    assert ("minicpmv4.6", 32, 4096) not in shapes  # in_proj_a/b: too small to be quantized
    # fuse_projections' stacked GEMMs (LLM only), timed at one-token calls only; the 4.6 linear attention's
    # in_proj_qkv + in_proj_z is 12288 x 4096, a plain layer's shape already (its rows cover every M)
    fused = {(s.model, s.n, s.k): s for s in all_shapes() if s.ms is not None}
    assert set(fused) == {("minicpmv4.6", 24576, 4096), ("minicpmv4.6", 10240, 4096), ("llama3-v2.5", 28672, 4096),
                          ("llama3-v2.5", 6144, 4096), ("minicpmv2.6", 37888, 3584), ("minicpmv2.6", 4608, 3584)}
    assert all(s.ms == (1,) for s in fused.values())
    assert fused[("llama3-v2.5", 6144, 4096)].names == ["model.layers.0.self_attn.q_proj+k_proj+v_proj"]
    assert len(fused[("minicpmv4.6", 24576, 4096)].names) == 32  # every layer's gate / up, no vision tower's


def test_fused_shapes_are_timed_at_one_token_and_kept_apart_in_the_reports(tmp_path):
    from minicpm_int4.bench.readme import _largest_llm_shapes

    shapes = TINY + [LinearShape("tiny", 160, 256, ["a.q_proj+k_proj"], ms=(1,))]
    res = run_microbench(shapes, ms=[1, 4, 17], backends=[B.Fp16Matmul(), B.OursW4A16("torch"), B.OursW4A8("torch")],
                         device=torch.device("cpu"), group_size=64, rep_ms=1, progress=False, copy_bw_gbps=50.0)
    fused = [r for r in res["rows"] if r["n"] == 160]
    assert fused and {r["m"] for r in fused} == {1} and all(r["fused"] for r in fused)
    assert {r["backend"] for r in fused} == {"fp16", "w4a16-torch"}  # (W4A8 from 17 rows: nothing at M = 1)
    assert not any(r["fused"] for r in res["rows"] if r["n"] != 160)
    assert {r["k"] for r in res["act_quant"]} == {256, 128}
    assert _largest_llm_shapes(res["rows"]) == [{"model": "tiny", "n": 96, "k": 256}]
    write_all(res, str(tmp_path), "bench")
    md = (tmp_path / "bench.md").read_text()
    assert "| 160 x 256 (fused) |" in md and "(fused): the stacked GEMM" in md and "| 96 x 256 |" in md


def test_profile_harness_on_tiny_models(tmp_path):
    from minicpm_int4.bench.e2e import run_profile
    from minicpm_int4.bench.report import write_checkpoint

    seen = []

    def checkpoint(r):
        seen.append(len(r["runs"]))
        write_checkpoint(r, str(tmp_path / "ckpt"), "profile")

    res = run_profile(models=["minicpmv4.6", "llama3-v2.5"], size="tiny", prompt_tokens=8, new_tokens=3,
                      image_grid=4, modes=["eager"], group_size=32, device=torch.device("cpu"), dtype=torch.float32,
                      checkpoint=checkpoint)
    assert [r["weights"] for r in res["runs"]] == ["float32", "int4", "int4-fused"] * 2
    # written after every run, marked unfinished, no half-written files left
    assert seen == [1, 2, 3, 4, 5, 6] and "incomplete" not in res
    ckpt = json.loads((tmp_path / "ckpt" / "profile.json").read_text())
    assert len(ckpt["runs"]) == 6 and "did not finish" in ckpt["incomplete"]
    assert "incomplete" in (tmp_path / "ckpt" / "profile.md").read_text()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["profile.json", "profile.md"]
    assert [("patch_model_s" in r) for r in res["runs"]] == [False, True, False] * 2
    # the int4-fused runs: the same int4 layers after fuse_projections, whose stacked GEMMs ran in the decode
    for int4, r in zip(res["runs"][1::3], res["runs"][2::3]):
        assert r["fused_groups"] > 0 and r["launches_saved_per_token"] >= r["fused_groups"] and r["stacked_calls"] > 0
        assert r["fusion_off"] == [] and r["weight_bytes"] == int4["weight_bytes"]  # (no byte added)
    for r in res["runs"]:
        assert "error" not in r, r
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] >= 0 and r["weight_bytes"] > 0
    int4 = [r for r in res["runs"] if r["weights"] == "int4"]
    fp = [r for r in res["runs"] if r["weights"] == "float32"]
    assert all(a["weight_bytes"] < b["weight_bytes"] for a, b in zip(int4, fp))
    assert res["runs"][0]["vision_ms"] > 0 and res["copy_bandwidth_gbps"] > 0
    files = write_all(res, str(tmp_path), "profile")
    assert "profile.md" in {os.path.basename(f) for f in files}
    md = (tmp_path / "profile.md").read_text()
    assert "decode ms/token" in md
    # what the linear attention ran on, as installed here (CI has neither package)
    from importlib.util import find_spec

    assert set(res["env"]["model_kernels"]) == {"fla-core", "causal-conv1d"}
    if find_spec("fla") is None:
        assert res["env"]["model_kernels"]["fla-core"] is None
        assert "linear-attention layers (Qwen3.5) ran on PyTorch in place of fla-core (not installed)" in md


def test_model_kernels_count_only_where_their_module_imports(monkeypatch):
    """An installed fla-core whose module fails to import is recorded as such (transformers then runs its
    PyTorch path): the profile's line says PyTorch, naming the error, not the installed version alone."""
    from minicpm_int4.bench import env as E
    from minicpm_int4.bench.report import _env_lines

    monkeypatch.setattr(E, "MODEL_KERNEL_MODULES", {"fla-core": "json", "causal-conv1d": "minicpm_int4_no_such_mod"})
    versions = {"fla-core": "0.6.0", "causal-conv1d": "1.7.0"}
    unusable = E.model_kernels_unusable(versions)
    assert set(unusable) == {"causal-conv1d"} and "ModuleNotFoundError" in unusable["causal-conv1d"]
    assert E.model_kernels_unusable({"fla-core": None, "causal-conv1d": None}) == {}  # not installed: nothing tried
    line = next(x for x in _env_lines({"model_kernels": versions, "model_kernels_unusable": unusable},
                                      model_kernels=True) if "linear-attention" in x)
    assert "ran on fla-core 0.6.0, PyTorch in place of causal-conv1d (1.7.0 installed, its import failed: " \
           "ModuleNotFoundError" in line
    # env_info records it where the import fails (and not at all where every installed one imports)
    monkeypatch.setattr(E, "peer_versions", lambda packages=E.PEER_PACKAGES: dict.fromkeys(packages, "1.0"))
    info = E.env_info(torch.device("cpu"))
    assert set(info["model_kernels_unusable"]) == {"causal-conv1d"}
    from minicpm_int4 import diagnose

    monkeypatch.setattr(diagnose, "env_info", E.env_info)
    assert "linear attention (transformers' Qwen3.5 layers) on a GPU runs on: fla-core 1.0, PyTorch in place of causal-conv1d " \
           "(1.0 installed, its import failed: ModuleNotFoundError" in diagnose.format_report(diagnose.collect())
    monkeypatch.setattr(E, "MODEL_KERNEL_MODULES", {"fla-core": "json", "causal-conv1d": "os"})
    assert "model_kernels_unusable" not in E.env_info(torch.device("cpu"))


def test_profile_w4a8_run_flips_the_int4_layers_to_int8_activations_and_back(monkeypatch):
    """profile --w4a8: after the int4 eager run, one more eager run of the same layers with act="int8" (no
    re-patch), decoding W4A8_PROFILE_TOKENS tokens; the layers are W4A16 again afterwards; targets.md's e2e
    section compares its vision and prefill times with the int4 run's and keeps fp16 vs int4 as it was."""
    from minicpm_int4 import QuantLinear
    from minicpm_int4.bench import e2e
    from minicpm_int4.bench.targets import e2e_lines
    from minicpm_int4.cli import build_parser

    acts = []
    real_measure = e2e.measure

    def spy(name, model, inputs, new_tokens, device, mode, weights):
        acts.append((weights, new_tokens, {m.act for m in model.modules() if isinstance(m, QuantLinear)}))
        return real_measure(name, model, inputs, new_tokens, device, mode, weights)

    monkeypatch.setattr(e2e, "measure", spy)
    res = e2e.run_profile(models=["llama3-v2.5"], size="tiny", prompt_tokens=24, new_tokens=12, modes=["eager"],
                          group_size=32, device=torch.device("cpu"), dtype=torch.float32, w4a8=True)
    assert [(w, n) for w, n, _ in acts] == [("float32", 12), ("int4", 12), ("int4-fused", 12),
                                           ("int4-w4a8", e2e.W4A8_PROFILE_TOKENS)]
    assert acts[0][2] == set() and acts[1][2] == acts[2][2] == {None} and acts[3][2] == {"int8"}
    assert res["config"]["w4a8"] is True
    assert [r["weights"] for r in res["runs"]] == ["float32", "int4", "int4-fused", "int4-w4a8"]
    assert all("error" not in r for r in res["runs"]) and res["runs"][3]["new_tokens"] == e2e.W4A8_PROFILE_TOKENS
    lines = e2e_lines(res)
    assert lines[2].startswith("| llama3-v2.5 | eager | ") and "W4A8 end to end" in "\n".join(lines)
    assert lines[-1].startswith("| llama3-v2.5 | ") and lines[-1].count("x |") == 1  # no vision tower: prefill only
    at = next(i for i, line in enumerate(lines) if line.startswith("Sibling projections fused"))  # int4-fused vs int4
    row = lines[at + 4].split(" | ")
    a, b = res["runs"][1]["tokens_per_s"], res["runs"][2]["tokens_per_s"]  # (None where a loaded CPU timed no decode)
    assert row[:2] == ["| llama3-v2.5", "eager"] and row[4] == (f"{b / a:.2f}x" if a and b else "-")
    assert row[5] == f"{res['runs'][2]['launches_saved_per_token']}"
    fused_run = res["runs"][2]
    assert fused_run["groups_ran_stacked"] == fused_run["fused_groups"] > 0  # (the tiny LLM's every group, eager)
    assert row[6] == f"{fused_run['fused_groups']} of {fused_run['fused_groups']} |"
    assert build_parser().parse_args(["profile", "--w4a8"]).w4a8


def test_profile_runs_the_graphed_fused_compiles_after_every_required_run(monkeypatch):
    """The order of the profile's runs (measure stubbed): per mode and model fp16, int4 (and eager / cudagraph
    int4-fused); the graphed mode's int4-fused runs - a compile each, beyond what the tables of fp16 vs int4
    need - in a pass of their own at the end, on a model patched and fused there."""
    from minicpm_int4 import QuantLinear
    from minicpm_int4.bench import e2e

    seen = []

    def stub(name, model, inputs, new_tokens, device, mode, weights):
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        seen.append((name, weights, mode, bool(layers), any(m._fusion is not None for m in layers)))
        return {"model": name, "weights": weights, "mode": mode}

    monkeypatch.setattr(e2e, "measure", stub)
    e2e.run_profile(models=["minicpmv4.6", "llama3-v2.5"], size="tiny", prompt_tokens=8, new_tokens=2,
                    group_size=32, device=torch.device("cpu"), dtype=torch.float32)
    want = []
    for mode in ("eager", "cudagraph", "graphed"):
        for name in (("minicpmv4.6", "llama3-v2.5") if mode != "graphed" else ("llama3-v2.5", "minicpmv4.6")):
            want += [(name, "float32", mode, False, False), (name, "int4", mode, True, False)]
            if mode != "graphed":
                want.append((name, "int4-fused", mode, True, True))
    want += [(name, "int4-fused", "graphed", True, True) for name in ("llama3-v2.5", "minicpmv4.6")]
    assert seen == want


def test_profile_graphed_mode_compiles_only_the_decode_step():
    """Graphed: static cache + transformers' own decode-step compile (told to compile on CPU here,
    as it does by itself on CUDA); the run says how it was graphed, counts graph breaks (none through
    QuantLinear: the int4 run has the fp32 run's - none with CI's torch; torch 2.4's dynamo breaks 13 times
    in transformers 4.55's own code), and the graphed runs come after every eager one."""
    from minicpm_int4.bench.e2e import run_profile

    try:  # transformers < 4.48 has no decode-step compile, and 4.48's is for CUDA only: the harness compiles model.forward
        from transformers import CompileConfig
        how = "transformers' decode-step compile" if hasattr(CompileConfig, "_compile_all_devices") else \
            "torch.compile(model.forward"
    except ImportError:
        how = "torch.compile(model.forward"
    res = run_profile(models=["llama3-v2.5"], size="tiny", prompt_tokens=8, new_tokens=3, modes=["eager", "graphed"],
                      group_size=32, device=torch.device("cpu"), dtype=torch.float32)
    assert [(r["weights"], r["mode"]) for r in res["runs"]] == [
        ("float32", "eager"), ("int4", "eager"), ("int4-fused", "eager"),
        ("float32", "graphed"), ("int4", "graphed"), ("int4-fused", "graphed")]
    from helpers import static_cache_reads_linear_weights

    graphed = res["runs"][3:]
    if static_cache_reads_linear_weights():  # the int4 runs fail, and say why (test_patch)
        for _ in range(2):
            assert "has no `weight`: it holds it as int4" in graphed.pop()["error"]
    else:  # the compiled decode step held the stacked GEMMs (fusion.py), with no graph break of its own
        assert graphed[-1]["groups_in_graph"] == graphed[-1]["groups_ran_stacked"] == graphed[-1]["fused_groups"] > 0
    for r in graphed:
        assert "error" not in r, r
        assert r["graphed_by"].startswith(how) and r["graph_breaks"] == graphed[0]["graph_breaks"]
        # (decode time per token can be lost in timer noise on a tiny CPU model: >= 0, not > 0)
        assert r["vision_ms"] is None and r["generate_ms"] > 0 and r["decode_ms_per_token"] >= 0
    from minicpm_int4.bench.report import profile_markdown

    md = profile_markdown(res)
    assert f"llama3-v2.5 float32 graphed: {how}" in md and f"graph breaks: {graphed[0]['graph_breaks']}" in md
    assert "`patch_model` took" in md
    # nothing of the graphed setup is left on a model after its run
    from minicpm_int4.bench.e2e import _graph_decode_step, _ungraph, build_model

    model, _ = build_model("llama3-v2.5", "tiny", torch.float32, torch.device("cpu"))
    _graph_decode_step(model, torch.device("cpu"))
    assert model.generation_config.cache_implementation == "static"
    _ungraph(model)
    assert model.generation_config.cache_implementation is None
    # (the default of this transformers: none, or 4.48's CompileConfig(); 4.40 - 4.47 have no such setting)
    default = getattr(type(model.generation_config)(), "compile_config", None)
    assert type(getattr(model.generation_config, "compile_config", None)) is type(default)
    assert not hasattr(model.forward, "_torchdynamo_orig_callable")


@pytest.mark.parametrize("name", ["llama3-v2.5", "minicpmv4.6"])
def test_profile_cudagraph_mode_replays_one_captured_decode_step(name, tmp_path):
    """cudagraph: static cache, the decode step captured by hand and replayed inside generate() (off CUDA the
    replay calls forward on the captured buffers: the plumbing of every decode argument this transformers
    passes, checked here by the tokens, which must be the eager static-cache decode's)."""
    from minicpm_int4.bench.e2e import CHECK_TOKENS, WARMUP_STEPS, run_profile
    from minicpm_int4.bench.report import profile_markdown

    import transformers
    from helpers import static_cache_fails_unpatched

    why = static_cache_fails_unpatched() if name == "minicpmv4.6" else None
    if why:
        pytest.skip(f"transformers {transformers.__version__} cannot decode the fp32 {name} model itself with a "
                    f"static cache ({why[:120]})")
    new_tokens = 8
    res = run_profile(models=[name], size="tiny", prompt_tokens=8, new_tokens=new_tokens, image_grid=4,
                      modes=["cudagraph"], group_size=32, device=torch.device("cpu"), dtype=torch.float32)
    assert [(r["weights"], r["mode"]) for r in res["runs"]] == [
        ("float32", "cudagraph"), ("int4", "cudagraph"), ("int4-fused", "cudagraph")]
    from helpers import static_cache_reads_linear_weights

    runs = res["runs"]
    if static_cache_reads_linear_weights():  # transformers 4.38 - 4.41: as in the graphed mode
        for _ in range(2):
            assert "has no `weight`: it holds it as int4" in runs.pop()["error"]
        # and their static-cache step takes the 2-D attention mask that generate() widens by a column a token (later
        # versions hand it one of the cache's fixed width): named, as no graph of fixed shapes replays it
        assert re.search(r"decode-step argument \.attention_mask is \(1, \d+\) .* a CUDA graph replays fixed shapes",
                         runs[0]["error"]), runs[0]
        return
    # the fused layers' stacked GEMMs ran in the replayed steps, which decoded the eager decode's tokens
    assert runs[2]["stacked_calls"] > 0 and runs[2]["launches_saved_per_token"] > 0
    for r in runs:
        assert "error" not in r, r
        assert r["graphed_by"].startswith("the decode step captured by hand") and r["emulated"] is True
        # the prefill gives the first token; then WARMUP_STEPS eager steps, the capture, the replays
        assert r["replayed_steps"] == new_tokens - 1 - WARMUP_STEPS - 1
        assert r["tokens_checked"] == min(CHECK_TOKENS, new_tokens) == r["tokens_same_as_eager"]
        assert r["graph_step_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["vision_ms"] is None
    md = profile_markdown(res)
    assert f"{name} float32 cudagraph: the decode step captured by hand" in md
    assert f"(emulated: nothing is captured off CUDA); {new_tokens - 1 - WARMUP_STEPS - 1} steps replayed" in md
    assert f"its first {min(CHECK_TOKENS, new_tokens)} tokens are the eager decode's" in md
    assert {"profile.json", "profile.md"} <= {os.path.basename(f) for f in write_all(res, str(tmp_path), "profile")}
    res["runs"] = [dict(runs[0], tokens_same_as_eager=3)]  # a decode that left the eager one: said, in bold
    md = profile_markdown(res)
    assert f"**its tokens leave the eager decode's at token 4 of {min(CHECK_TOKENS, new_tokens)} checked**" in md


@pytest.mark.parametrize("name", ["llama3-v2.5", "minicpmv4.6"])
def test_the_captured_decode_step_has_no_data_dependent_host_read(name):
    """What the cudagraph mode captures, checked off CUDA: dynamo traces the decode step generate() makes
    (this transformers' arguments, static cache) into one graph with no break - a read of a tensor's value
    by Python (`.item()`, `if tensor:`) would break it, and on a GPU would synchronise inside the capture."""
    import copy

    from minicpm_int4.bench.e2e import _hand_graph_setup, build_model, make_inputs

    model, _ = build_model(name, "tiny", torch.float32, torch.device("cpu"))
    inputs = make_inputs(name, model, 8, 4, torch.device("cpu"))
    _hand_graph_setup(model)
    forward, found = model.forward, []

    def spy(*args, **kwargs):
        if not found and kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[-1] == 1:
            torch._dynamo.reset()  # (a copy of the step's arguments: the traced run must not advance the cache)
            found.append(torch._dynamo.explain(forward)(**copy.deepcopy(kwargs)))
        return forward(*args, **kwargs)

    model.forward = spy
    with torch.no_grad():
        model.generate(**inputs, do_sample=False, min_new_tokens=3, max_new_tokens=8)
    assert found, "generate() made no decode step"
    assert (found[0].graph_count, found[0].graph_break_count) == (1, 0), found[0].break_reasons


def test_the_cudagraph_mode_keeps_transformers_from_compiling_and_ungraph_restores_the_model():
    """The hand-captured step must run as Python: disable_compile where transformers has it, and get_compiled_call
    giving the plain call (transformers 4.48 compiles a static cache's decode step on CUDA with no switch); after
    the run the model is as built - a compile_config this transformers accepts (4.48 refused the None it got)."""
    from minicpm_int4.bench.e2e import _hand_graph_setup, _ungraph, build_model

    model, _ = build_model("llama3-v2.5", "tiny", torch.float32, torch.device("cpu"))
    default = getattr(type(model.generation_config)(), "compile_config", None)  # (4.40 - 4.47 have none)
    _hand_graph_setup(model)
    assert model.generation_config.cache_implementation == "static" and model.generation_config.disable_compile
    assert model.get_compiled_call(default) == model.__call__
    _ungraph(model)
    assert "get_compiled_call" not in model.__dict__ and model.generation_config.cache_implementation is None
    assert type(getattr(model.generation_config, "compile_config", None)) is type(default)
    model.generation_config.validate()


def test_profile_runs_its_modes_in_order_and_refuses_an_unknown_one():
    from minicpm_int4.bench.e2e import run_profile

    with pytest.raises(ValueError, match=r"unknown profile mode\(s\) \['fast'\]"):
        run_profile(models=["llama3-v2.5"], size="tiny", modes=["eager", "fast"], device=torch.device("cpu"))
    res = run_profile(models=["llama3-v2.5"], size="tiny", prompt_tokens=8, new_tokens=2, modes=["cudagraph", "eager"],
                      group_size=32, device=torch.device("cpu"), dtype=torch.float32, time_budget_s=0.0)
    assert res["config"]["modes"] == ["eager", "cudagraph"] and "before llama3-v2.5 eager" in res["incomplete"]


def test_captured_decode_step_protocol_and_refusals():
    """_CapturedDecode on a stand-in forward: the prefill and WARMUP_STEPS decode steps eager, one capture, then
    every step's tensors copied into the captured buffers; a cache that moves (a new tensor, a Python number)
    during a step, a step whose shapes or flags differ from the capture's, and a generate() too short to
    replay anything are refused, naming what."""
    from minicpm_int4.bench.e2e import WARMUP_STEPS, _CapturedDecode

    class Cache:
        def __init__(self):
            self.layers = [types.SimpleNamespace(keys=torch.zeros(4), seen=torch.zeros((), dtype=torch.long))]

    calls = []

    def forward(input_ids, cache, attention_mask, use_cache):
        calls.append((input_ids, attention_mask))
        cache.layers[0].seen.add_(1)  # in place, as a static cache counts
        return types.SimpleNamespace(logits=input_ids.float() * 2)

    cache = Cache()
    step = _CapturedDecode(forward, torch.device("cpu"))
    ids = lambda v: torch.tensor([[v]])  # noqa: E731
    masks = [torch.randn(1, 1, 1, 6) for _ in range(8)]
    step(input_ids=torch.tensor([[1, 2, 3]]), cache=cache, attention_mask=masks[0][..., :3], use_cache=True)  # prefill
    with pytest.raises(RuntimeError, match="no decode step was replayed"):
        step.replay_stats()
    outs = [step(input_ids=ids(10 + i), cache=cache, attention_mask=masks[i], use_cache=True) for i in range(5)]
    assert [float(o.logits) for o in outs] == [20.0, 22.0, 24.0, 26.0, 28.0]
    assert int(cache.layers[0].seen) == 6
    captured_ids, captured_mask = calls[1 + WARMUP_STEPS]
    for i, (x, m) in enumerate(calls[1 + WARMUP_STEPS:]):  # the capture's buffers, refilled every step
        assert x is captured_ids and m is captured_mask
    assert step.replay_stats()["replayed_steps"] == 5 - WARMUP_STEPS - 1
    with pytest.raises(RuntimeError, match=r"argument \.attention_mask is \(1, 1, 1, 7\).*replays fixed shapes"):
        step(input_ids=ids(1), cache=cache, attention_mask=torch.randn(1, 1, 1, 7), use_cache=True)
    with pytest.raises(RuntimeError, match=r"argument \.use_cache is False, the captured step had True"):
        step(input_ids=ids(1), cache=cache, attention_mask=masks[0], use_cache=False)
    with pytest.raises(RuntimeError, match=r"argument \.cache is .*captured step had"):
        step(input_ids=ids(1), cache=Cache(), attention_mask=masks[0], use_cache=True)

    def rebinding(input_ids, cache, attention_mask, use_cache):
        cache.layers[0].keys = torch.cat([cache.layers[0].keys, input_ids[0].float()])  # a new tensor every step
        return None

    def counting(input_ids, cache, attention_mask, use_cache):
        cache.steps = getattr(cache, "steps", 0) + 1
        return None

    for fn, moved in ((rebinding, r"cache\.layers\[0\]\.keys"), (counting, r"cache\.steps")):
        step = _CapturedDecode(fn, torch.device("cpu"))
        c = Cache()
        c.steps = 0
        with pytest.raises(RuntimeError, match=f"Cache is not replayable: an eager decode step changed {moved}"):
            step(input_ids=ids(1), cache=c, attention_mask=masks[0], use_cache=True)


def test_bench_writes_a_checkpoint_after_each_shape(tmp_path):
    from minicpm_int4.bench.report import write_checkpoint

    calls = []

    def checkpoint(r):
        calls.append(len(r["rows"]))
        write_checkpoint(r, str(tmp_path), "bench")

    res = run_microbench(TINY, ms=[1, 4], backends=[B.Fp16Matmul(), B.OursW4A16("torch")], device=torch.device("cpu"),
                         group_size=64, rep_ms=1, progress=False, copy_bw_gbps=1.0, checkpoint=checkpoint)
    assert calls == [2, 4, 6, 8] and len(res["rows"]) == 8
    ckpt = json.loads((tmp_path / "bench.json").read_text())
    assert validate_micro(ckpt) is None and "did not finish" in ckpt["incomplete"]
    assert all(r["speedup_vs_fp16"] is not None for r in ckpt["rows"])
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "bench.md"]


def test_bench_refuses_cpu_timings_by_default(capsys):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert main(["bench"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["run_gpu_suite.sh", "fetch_peer_wheels.sh", "warm_triton_cache.sh",
                                    "prebuild_extension.sh", "prepare_gpu_call.sh"])
def test_gpu_suite_scripts_parse(script):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(["bash", "-n", os.path.join(here, "benchmarks", script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_prebuild_extension_skips_a_python_that_does_not_run(tmp_path):
    """prebuild_extension.sh's interpreter of the image's Python is run, not only looked up: pyenv puts a shim of every
    installed version on PATH (`python3.12`) that fails - "pyenv: python3.12: command not found", 127 - where another
    version is selected, and the script took that shim and died making its venv. With only such a shim and no pyenv
    version of it, it must say that no such Python was found (a clear 1, before any venv or download)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python3.98"
    shim.write_text("#!/bin/sh\necho 'pyenv: python3.98: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "PREBUILD_PY_VERSION": "3.98",
           "PREBUILD_VENV": str(tmp_path / "venv")}
    r = subprocess.run(["bash", os.path.join(here, "benchmarks", "prebuild_extension.sh")], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "no Python 3.98 found" in r.stderr
    assert not (tmp_path / "venv").exists()


def _run_suite_with_a_stub_python(tmp_path, wheels, tcache=False, prebuilt=False, **env):
    """benchmarks/run_gpu_suite.sh copied beside `wheels` (empty files in .whl/) - and, with `tcache`, a warm Triton
    cache's manifest in .tcache/, with `prebuilt` a prebuilt extension's in .prebuilt/ - and run with PYTHON = a
    stub that records each call's arguments, PYTHONPATH, dispatch table and MINICPM_INT4_BUILD_CUDA (and creates a
    `--target` folder, as pip does): the calls, in order."""
    import shutil

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = tmp_path / "checkout"
    (root / "benchmarks").mkdir(parents=True)
    shutil.copy(os.path.join(here, "benchmarks", "run_gpu_suite.sh"), root / "benchmarks")
    (root / ".whl").mkdir()
    for w in wheels:
        (root / ".whl" / w).write_bytes(b"")
    if tcache:
        (root / ".tcache").mkdir()
        (root / ".tcache" / "manifest.json").write_text("{}")
    if prebuilt:
        (root / ".prebuilt").mkdir()
        (root / ".prebuilt" / "manifest.json").write_text("{}")
    calls = tmp_path / "calls.jsonl"
    stub = tmp_path / "python"
    stub.write_text("#!/usr/bin/env python3\n"
                    "import json, os, sys\n"
                    "a = sys.argv[1:]\n"
                    "if '--target' in a: os.makedirs(a[a.index('--target') + 1], exist_ok=True)\n"
                    "if a[0].endswith('make_dispatch_table.py'): open(a[a.index('--out') + 1], 'w').write('{}')\n"
                    # a bench that compiles two Triton kernels: two entries in the cache (a group file each)
                    "if 'bench' in a and os.environ.get('TRITON_CACHE_DIR'):\n"
                    "    for d in ('AAA', 'BBB'):\n"
                    "        os.makedirs(os.path.join(os.environ['TRITON_CACHE_DIR'], d), exist_ok=True)\n"
                    "        open(os.path.join(os.environ['TRITON_CACHE_DIR'], d, '__grp__k.json'), 'w').write('{}')\n"
                    f"with open({str(calls)!r}, 'a') as f:\n"
                    "    f.write(json.dumps({'args': a, 'pythonpath': os.environ.get('PYTHONPATH', ''),\n"
                    "                        'table': os.environ.get('MINICPM_INT4_DISPATCH_TABLE'),\n"
                    "                        'wgmma': os.environ.get('MINICPM_INT4_W4A8_WGMMA'),\n"
                    "                        'wgmma16': os.environ.get('MINICPM_INT4_W4A16_WGMMA'),\n"
                    "                        'split16': os.environ.get('MINICPM_INT4_W4A16_WGMMA_SPLIT'),\n"
                    "                        'build_cuda': os.environ.get('MINICPM_INT4_BUILD_CUDA')}) + '\\n')\n"
                    # a call with an argument that is one of STUB_FAIL's (|-separated) fails
                    "fail = set(filter(None, os.environ.get('STUB_FAIL', '').split('|')))\n"
                    "sys.exit(1 if fail & set(a) else 0)\n")
    stub.chmod(0o755)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("SUITE_", "MINICPM_INT4_")) and k != "PYTHONPATH"}
    run_env.update(PYTHON=str(stub), SUITE_SCRATCH=str(tmp_path / "scratch"), PATH=os.environ["PATH"], **env)
    (tmp_path / "scratch").mkdir()
    r = subprocess.run(["bash", str(root / "benchmarks" / "run_gpu_suite.sh"), str(tmp_path / "out")], env=run_env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in calls.read_text().splitlines()]
    return out, (tmp_path / "out" / "suite.log").read_text()


def _suite_call(calls, *words):
    found = [c for c in calls if all(w in c["args"] for w in words)]
    assert len(found) == 1, (words, [c["args"] for c in calls])
    return found[0]


def test_gpu_suite_gives_the_carried_model_kernels_to_the_profile_only(tmp_path):
    """fla-core / einops (MiniCPM-V 4.6's linear attention in transformers) go into a site only the profile has on its
    path; the peers' wheels into theirs, which the tests, bench and profile have; the profile runs "auto" on the
    dispatch table its bench wrote - and, with no table written, on the package's (no pointer to a missing file)."""
    wheels = ["bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", "gemlite-0.6.0.post2-py3-none-any.whl",
              "fla_core-0.6.0-py3-none-any.whl", "einops-0.8.2-py3-none-any.whl"]
    scratch = str(tmp_path / "scratch")
    peers, model = f"{scratch}/minicpm-int4-peers", f"{scratch}/minicpm-int4-model-kernels"
    calls, log = _run_suite_with_a_stub_python(tmp_path, wheels)
    pip_peers = _suite_call(calls, "pip", "--target", peers)
    assert sorted(os.path.basename(a) for a in pip_peers["args"] if a.endswith(".whl")) == sorted(wheels[:2])
    pip_model = _suite_call(calls, "pip", "--target", model)
    assert sorted(os.path.basename(a) for a in pip_model["args"] if a.endswith(".whl")) == sorted(wheels[2:])
    tests, bench = _suite_call(calls, "-m", "gpu"), _suite_call(calls, "bench")
    profile = _suite_call(calls, "profile")
    for c in (tests, bench, profile):
        assert peers in c["pythonpath"].split(":")
    assert model not in tests["pythonpath"] and model not in bench["pythonpath"]
    assert profile["pythonpath"].split(":")[:2] == [model, peers]
    assert profile["table"] == f"{scratch}/minicpm-int4-dispatch-table.json"  # the one this bench's stage wrote
    assert "=== [model-kernels] (limit" in log

    # the follow-up call that runs only the profile installs the model kernels too, and points "auto" at no table
    # (it runs on the package's, where the first call's is committed by then)
    (tmp_path / "second").mkdir()
    calls, log = _run_suite_with_a_stub_python(tmp_path / "second", wheels, SUITE_STAGES="install,profile")
    assert [c for c in calls if "bench" in c["args"] or "gpu" in c["args"]] == []
    profile = _suite_call(calls, "profile")
    assert profile["pythonpath"].split(":")[0] == str(tmp_path / "second" / "scratch" / "minicpm-int4-model-kernels")
    assert profile["table"] is None

    # without model-kernel wheels the profile's path is the peers' alone, and the log says why
    (tmp_path / "third").mkdir()
    calls, log = _run_suite_with_a_stub_python(tmp_path / "third", wheels[:2], SUITE_STAGES="install,profile")
    assert "minicpm-int4-model-kernels" not in _suite_call(calls, "profile")["pythonpath"]
    assert "=== [model-kernels] none carried" in log


@pytest.mark.parametrize("carried, refused", [(False, False), (True, False), (True, True)])
def test_gpu_suite_installs_a_carried_extension_or_builds_one(tmp_path, carried, refused):
    """A prebuilt extension (.prebuilt/, benchmarks/prebuild_extension.sh) is offered to prebuilt_extension.py's
    install first; taken, the package goes in without building (MINICPM_INT4_BUILD_CUDA=0); refused - or none
    carried, which the log says - the install stage builds it (=1), as it did before there was one."""
    calls, log = _run_suite_with_a_stub_python(tmp_path, [], prebuilt=carried, SUITE_STAGES="install",
                                               STUB_FAIL=".prebuilt" if refused else "")
    offered = [c for c in calls if any(a.endswith("prebuilt_extension.py") for a in c["args"])]
    assert [c["args"][-2:] for c in offered] == ([["install", ".prebuilt"]] if carried else [])
    pips = [c for c in calls if c["args"][:3] == ["-m", "pip", "install"] and "-e" in c["args"]]
    assert [c["build_cuda"] for c in pips] == (["0"] if carried and not refused else ["1"])
    if carried:
        assert calls.index(offered[0]) < calls.index(pips[0])
        assert f"=== [install-prebuilt] rc={1 if refused else 0}" in log
    else:
        assert "=== [install-prebuilt] none carried" in log
    assert "=== [install] rc=0" in log


@pytest.mark.parametrize("fail, wgmma", [("", None), ("w4a8_wgmma_small", "128"),
                                         ("w4a8_wgmma_small|w4a8_wgmma_small and t128", "0")])
def test_gpu_suite_turns_the_wgmma_kernel_off_only_as_its_smoke_tests_say(tmp_path, fail, wgmma):
    """The wgmma kernel's small tests (stage wgmma-smoke, pytest -k below) gate it for the rest of the suite: passed,
    untouched; failed with the 128-token ones passing alone, MINICPM_INT4_W4A8_WGMMA=128; both failed, 0 - also
    where SUITE_STAGES names wgmma-smoke but not its fallback stage, which belongs to it (it was skipped there,
    returning success: the 128-token blocks kept on, untested)."""
    for stages in (None, "wgmma-smoke,gpu-tests"):
        sub = tmp_path / (stages or "all")
        sub.mkdir()
        calls, log = _run_suite_with_a_stub_python(sub, [], STUB_FAIL=fail, **({"SUITE_STAGES": stages} if stages else {}))
        assert _suite_call(calls, "-m", "gpu")["wgmma"] == wgmma, (stages, fail, log)


@pytest.mark.parametrize("fail, wgmma16, split16", [("", None, None), ("w4a16_wgmma_small", "0", None),
                                                     ("w4a16_wgmma_split_small", None, "0")])
def test_gpu_suite_turns_the_w4a16_wgmma_kernel_or_its_split_off_only_as_its_smoke_tests_say(tmp_path, fail, wgmma16,
                                                                                              split16):
    """The W4A16 wgmma kernel's small tests (stage wgmma16-smoke) gate it, then its split-K's (wgmma16-split-smoke,
    run only where the kernel passed) gate the split: passed, untouched; the kernel's failed, MINICPM_INT4_W4A16_WGMMA=0
    (the split's tests not run: nothing of the kernel runs); the split's failed, MINICPM_INT4_W4A16_WGMMA_SPLIT=0 and
    the kernel kept - also where SUITE_STAGES names wgmma-smoke alone, whose stages they are."""
    for stages in (None, "wgmma-smoke,gpu-tests"):
        sub = tmp_path / (stages or "all")
        sub.mkdir()
        calls, log = _run_suite_with_a_stub_python(sub, [], STUB_FAIL=fail, **({"SUITE_STAGES": stages} if stages else {}))
        tests = _suite_call(calls, "-m", "gpu")
        assert (tests["wgmma16"], tests["split16"]) == (wgmma16, split16), (stages, fail, log)
        ran_split = [c for c in calls if "w4a16_wgmma_split_small" in c["args"]]
        assert bool(ran_split) == (fail != "w4a16_wgmma_small"), (stages, fail)


def test_gpu_suite_installs_a_carried_warm_triton_cache_before_any_kernel_runs(tmp_path):
    """.tcache/ (benchmarks/warm_triton_cache.sh) goes into Triton's cache right after the package - in the full
    suite and in the profile-only call alike, before the first stage that launches a kernel; without it the log
    says every kernel compiles on the machine."""
    for stages in (None, "install,profile"):
        sub = tmp_path / (stages or "all")
        sub.mkdir()
        calls, log = _run_suite_with_a_stub_python(sub, [], tcache=True, **({"SUITE_STAGES": stages} if stages else {}))
        warm = _suite_call(calls, "minicpm_int4.kernels.warm_cache")
        assert warm["args"] == ["-m", "minicpm_int4.kernels.warm_cache", "install", ".tcache"]
        install = _suite_call(calls, "pip", "-e")
        first_kernel = _suite_call(calls, "profile") if stages else _suite_call(calls, "w4a8_wgmma_small")
        assert calls.index(install) < calls.index(warm) < calls.index(first_kernel)
        assert "=== [warm-cache] (limit" in log
    (tmp_path / "none").mkdir()
    calls, log = _run_suite_with_a_stub_python(tmp_path / "none", [], TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    assert not [c for c in calls if "minicpm_int4.kernels.warm_cache" in c["args"]]
    assert "=== [warm-cache] none carried: every Triton kernel compiles here" in log
    # each stage's line counts the kernels it compiled (what the warm cache did not spare it), and only those
    assert re.search(r"^=== \[bench\] rc=0 in \d+s, 2 Triton kernels compiled$", log, re.M), log
    assert not re.search(r"^=== \[(?!bench\]).*Triton kernels compiled", log, re.M), log


def test_gpu_suite_runs_the_counters_stage_only_where_named(tmp_path):
    """The counters stage (ncu's hardware counters, 2 result files) is opt-in: the full suite already writes the 8
    files a device call brings back. Named in SUITE_STAGES it runs once, after the bench, into the output folder."""
    calls, log = _run_suite_with_a_stub_python(tmp_path, [])
    assert not [c for c in calls if any(a.endswith("ncu_counters.py") for a in c["args"])]
    assert "=== [counters] skipped: opt-in (name it in SUITE_STAGES)" in log
    (tmp_path / "named").mkdir()
    calls, log = _run_suite_with_a_stub_python(tmp_path / "named", [], SUITE_STAGES="install,bench,counters,targets",
                                               SUITE_COUNTERS_BUDGET_S="40")
    counters = _suite_call(calls, "--time-budget-s", "40")
    assert counters["args"][0].endswith("benchmarks/ncu_counters.py")
    assert counters["args"][counters["args"].index("--out") + 1] == str(tmp_path / "named" / "out")
    # after the bench (its kernels compiled and autotuned by then), before targets
    assert calls.index(_suite_call(calls, "bench")) < calls.index(counters) < calls.index(_suite_call(calls, "targets"))
    assert "=== [counters] (limit" in log
    # near the deadline its cases' budget shrinks to what the stage has left less 45 s for ncu's report (a stage
    # killed at its limit would bring back nothing: ncu prints its results only when the child ends)
    (tmp_path / "late").mkdir()
    calls, log = _run_suite_with_a_stub_python(tmp_path / "late", [], SUITE_STAGES="counters", SUITE_DEADLINE_S="90")
    args = _suite_call(calls, "--out", str(tmp_path / "late" / "out"))["args"]
    assert 30 <= int(args[args.index("--time-budget-s") + 1]) <= 40


def test_every_test_selection_of_the_gpu_suite_selects_tests():
    """Each `-k` the suite runs tests/test_gpu.py with (wgmma-smoke's W4A8 and W4A16 kernels, the former's 128-token
    fallback, the latter's split-K, the sanitizer's) selects
    some: one that a renamed test left empty would make pytest exit 5, which the suite reads as a failure (the wgmma
    kernel turned off for a run, a sanitizer verdict without tests)."""
    import re
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = open(os.path.join(here, "benchmarks", "run_gpu_suite.sh")).read()
    selections = re.findall(r'tests/test_gpu\.py -k "([^"$]+)"', script)
    assert len(selections) == 5, selections
    for k in selections:
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            os.path.join(here, "tests", "test_gpu.py"), "-k", k], capture_output=True, text=True,
                           cwd=here, timeout=300)
        assert r.returncode == 0 and re.search(r"^\d+/\d+ tests collected", r.stdout, re.M), (k, r.stdout[-500:])


def test_the_stage_lists_the_docs_give_name_the_suites_stages():
    """SUITE_STAGES lists in benchmarks/README.md and the suite's own header name stages the script has: a misspelt
    one is skipped without a word, on a GPU machine, after its device minutes are spent."""
    import re

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = open(os.path.join(here, "benchmarks", "run_gpu_suite.sh")).read()
    stages = set(re.findall(r"^\s*(?:if !? ?)?(?:\|\| )?stage ([a-z0-9-]+) ", script, re.M))
    stages |= set(re.findall(r"(?:\|\||&&|if !?|then|\]) stage ([a-z0-9-]+) ", script))
    assert {"install", "profile", "bench", "wgmma-smoke", "wgmma-smoke-t128", "wgmma16-smoke", "wgmma16-split-smoke",
            "model-kernels",
            "peers"} <= stages
    docs = script + open(os.path.join(here, "benchmarks", "README.md")).read()
    lists = re.findall(r"SUITE_STAGES=([a-z0-9,-]+)", docs)
    assert len(lists) >= 4
    for names in lists:
        assert set(names.split(",")) <= stages, names


def test_readme_performance_section_is_generated_from_results(tmp_path):
    from minicpm_int4.bench.e2e import run_profile
    from minicpm_int4.bench.readme import END, START, update_readme

    gpu_dir = tmp_path / "results" / "some-gpu"
    res = run_microbench([LinearShape("m", 96, 256), LinearShape("m", 200000, 64)], ms=[1, 16], device=torch.device("cpu"),
                         backends=[B.Fp16Matmul(), B.OursW4A16("torch")], group_size=64, rep_ms=1, progress=False,
                         copy_bw_gbps=10.0)
    write_all(res, str(gpu_dir), "bench")
    prof = run_profile(models=["llama3-v2.5"], size="tiny", prompt_tokens=8, new_tokens=2, modes=["eager"],
                       group_size=32, device=torch.device("cpu"), dtype=torch.float32)
    write_all(prof, str(gpu_dir), "profile")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{START}\nold\n{END}\n\nrest\n")
    assert update_readme(str(readme), str(tmp_path / "results"))
    text = readme.read_text()
    assert "old" not in text and "rest" in text
    assert "96 x 256" in text and "200000 x 64" not in text  # the largest LLM shape, lm_head-sized ones left out
    assert "w4a16-torch M=1" in text and "% " not in text.split(START)[0]
    assert "decode tokens/s" in text and "results/some-gpu/bench.md" in text
    assert not update_readme(str(readme), str(tmp_path / "results"))  # idempotent
    assert "linear-attention layers ran on" not in text  # no MiniCPM-V 4.6 run: nothing to say


def test_readme_says_what_minicpmv46_linear_attention_ran_on():
    from minicpm_int4.bench.readme import profile_summary

    run = {"model": "minicpmv4.6", "weights": "float16", "mode": "eager", "tokens_per_s": 30.0, "prefill_ms": 90.0}
    prof = {"config": {"prompt_tokens": 512, "new_tokens": 128}, "runs": [run],
            "env": {"model_kernels": {"fla-core": "0.6.0", "causal-conv1d": None}}}
    text = "\n".join(profile_summary(prof, "r"))
    assert "MiniCPM-V 4.6's linear-attention layers ran on fla-core 0.6.0, PyTorch in place of causal-conv1d " \
           "(not installed)." in text


def test_committed_readme_matches_committed_results():
    """The README's performance numbers come from benchmarks/results/ (regenerating changes nothing)."""
    from minicpm_int4.bench.readme import END, START, performance_section

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    block = text[text.index(START): text.index(END) + len(END)]
    assert block == performance_section(os.path.join(root, "benchmarks", "results"), root)


def test_profile_trace_writes_a_chrome_trace(tmp_path):
    from minicpm_int4.bench.e2e import build_model, make_inputs, trace_decode

    model, _ = build_model("llama3-v2.5", "tiny", torch.float32, torch.device("cpu"))
    inputs = make_inputs("llama3-v2.5", model, 8, 4, torch.device("cpu"))
    path = tmp_path / "trace.json"
    table = trace_decode(model, inputs, torch.device("cpu"), str(path))
    assert path.exists() and '"traceEvents"' in path.read_text()[:10000]
    assert "Name" in table and "aten::" in table


def _cpu_costs_module():
    import importlib.util

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("cpu_costs", os.path.join(here, "benchmarks", "cpu_costs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, here


def test_cpu_costs_summary_and_committed_results():
    """benchmarks/cpu_costs.py turns pytest-benchmark's JSON into microseconds and a table; the
    committed results/cpu/cpu_costs.json holds every test of tests/test_cpu_costs.py."""
    mod, here = _cpu_costs_module()
    from minicpm_int4.bench.env import env_info

    raw = {"machine_info": {"cpu": {"brand_raw": "Some CPU"}},
           "benchmarks": [{"name": "test_x", "stats": {"median": 2.5e-5, "iqr": 1e-6, "min": 2e-5, "rounds": 100}}]}
    s = mod.summarize(raw, env_info(torch.device("cpu")))
    assert s["env"]["device_name"] == "Some CPU" and s["env"]["device"] == "cpu" and s["env"]["commit"]
    assert s["rows"] == [{"test": "test_x", "median_us": pytest.approx(25.0), "iqr_us": pytest.approx(1.0),
                          "min_us": pytest.approx(20.0), "rounds": 100}]
    md = mod.markdown(s)
    assert md.startswith("# CPU-side costs (Some CPU)") and "| test_x | 25.0 | 1.0 | 20.0 | 100 |" in md
    with open(os.path.join(here, "benchmarks", "results", "cpu", "cpu_costs.json")) as f:
        committed = json.load(f)
    with open(os.path.join(here, "tests", "test_cpu_costs.py")) as f:
        tests = {line.split("(")[0][4:] for line in f if line.startswith("def test_")}
    # (a parametrized test's rows carry its ids: test_x[a], test_x[b])
    assert {r["test"].split("[")[0] for r in committed["rows"]} == tests and all(r["median_us"] > 0 for r in committed["rows"])
    assert {"device", "device_name", "commit", "torch", "triton", "timestamp_utc"} <= set(committed["env"])


def test_decode_sweep_times_each_setting_with_the_plan_it_makes(tmp_path, capsys):
    """benchmarks/decode_sweep.py (a GPU session's sweep of the decode kernels' launch settings) on the CPU,
    tiny: at M = 1 the GEMV's settings and the tensor-core kernel's, at M = 4 the decode kernel's (and its tile in
    natural order, DECODE_FRAGMENT = False, at the default plan), each row
    checked against the reference before it is timed, with the plan its settings made (the splits and trip
    steps differ where the settings do), the default first; JSON and Markdown written; bad options refused
    before anything runs; the module settings restored afterwards."""
    import importlib.util

    if not ops.triton_interpreter_active():
        pytest.skip("times the Triton kernels on CPU (TRITON_INTERPRET=1)")
    from minicpm_int4.kernels import w4a16

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("decode_sweep", os.path.join(here, "benchmarks", "decode_sweep.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = {n: getattr(w4a16, n) for n in ("GEMV_THREADS_PER_SM", "GEMV_PREFETCH", "GEMV_HALF2", "GEMV_DIRECT_LOADS",
                                               "GEMV_MAX_M", "DECODE_PROGRAMS_PER_SM", "DECODE_TRIP_WORDS",
                                               "DECODE_FRAGMENT")}
    out = tmp_path / "sweep"
    rc = mod.main(["--shapes", "32x1024", "--ms", "1,4", "--gemv-threads", "16,512", "--programs", "1,8",
                   "--trips", "16,32", "--rep-ms", "1", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "decode_sweep.json").read_text())
    assert not res["errors"] and res["copy_bandwidth_gbps"] > 0
    rows = {(r["m"], r["label"]): r for r in res["rows"]}
    m1 = [r for r in res["rows"] if r["m"] == 1]
    m4 = [r for r in res["rows"] if r["m"] == 4]
    # M = 1: the default, the GEMV's other (threads, prefetch, packed) triples (512 without prefetch, unpacked, is
    # the default), its direct loads with each (prefetch, packed) pair, and the tensor-core kernel at each (programs,
    # trip) and in natural order; M = 4: the default, the 4 decode settings (none of them the default's 2 programs
    # an SM) and the natural order
    assert len(m1) == 1 + 7 + 4 + 4 + 1 and len(m4) == 1 + 4 + 1
    direct = [r for r in m1 if r["setting"].get("GEMV_DIRECT_LOADS")]
    assert len(direct) == 4 and {r["plan"]["split_k"] for r in direct} == {m1[0]["plan"]["split_k"]}
    staged = rows[(4, "DECODE_FRAGMENT=False")]
    assert staged["plan"]["fragment"] is False and staged["plan"]["split_k"] == m4[0]["plan"]["split_k"]
    assert rows[(1, "GEMV_MAX_M=0, DECODE_FRAGMENT=False")]["plan"]["kernel"] == "decode"
    assert sum(bool(r["setting"].get("GEMV_HALF2")) for r in m1) == 4 + 2
    assert m1[0]["default"] and m4[0]["default"] and sum(r["default"] for r in res["rows"]) == 2
    assert {r["plan"]["kernel"] for r in m1} == {"gemv", "decode"} and {r["plan"]["kernel"] for r in m4} == {"decode"}
    assert all(r["check"] == "ok" and r["median_ms"] > 0 and r["gbps"] > 0 for r in res["rows"])
    gemv_splits = {r["setting"].get("GEMV_THREADS_PER_SM", 512): r["plan"]["split_k"] for r in m1
                   if r["plan"]["kernel"] == "gemv"}
    assert gemv_splits[16] < gemv_splits[512]  # fewer threads an SM wanted: K split fewer ways
    one, eight = (rows[(4, f"DECODE_PROGRAMS_PER_SM={p}, DECODE_TRIP_WORDS=16")] for p in (1, 8))
    assert one["plan"]["split_k"] < eight["plan"]["split_k"]
    long = rows[(4, "DECODE_PROGRAMS_PER_SM=1, DECODE_TRIP_WORDS=32")]
    assert long["plan"]["steps"] == 2 * one["plan"]["steps"]
    md = (out / "decode_sweep.md").read_text()
    assert "| 32 x 1024 | 4 | **default** |" in md and "default's time over this" in md
    assert "timing: cpu (not GPU kernel time" in md and "triton " in md
    assert {n: getattr(w4a16, n) for n in before} == before
    with pytest.raises(SystemExit):
        mod.main(["--ms", "17"])
    assert "--ms '17': decode sizes, 1 to 16" in capsys.readouterr().err


def test_input_scale_cost_script_runs_and_reports_both_layers(capsys):
    """benchmarks/input_scale_cost.py (the GPU suite's input-scale stage) on the CPU, small: a row per
    layer kind and M with the plain, scaled and permuted (act-order) layers' times, and a line each for
    the scale and the order in the log it prints into."""
    import importlib.util

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("input_scale_cost", os.path.join(here, "benchmarks", "input_scale_cost.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.measure("cpu", n=48, k=128, ms=(1, 3, 17), reps=2, dtype=torch.float32)
    # W4A16 at every M, W4A8 only where it quantizes activations (from W4A8_MIN_M rows on)
    assert [(r["act"], r["m"]) for r in rows] == [("fp", 1), ("fp", 3), ("fp", 17), ("int8", 17)]
    assert all(r["plain_eager_ms"] > 0 and r["input_scale_eager_ms"] > 0 and r["input_perm_eager_ms"] > 0 for r in rows)
    out = capsys.readouterr().out
    for what in ("input scale", "input perm"):
        assert f"{what} cost, W4A16 48 x 128 G=128 float32 M=1: eager" in out
        assert f"{what} cost, W4A16 48 x 128 G=128 float32 M=3: eager" in out
        assert f"{what} cost, W4A8 48 x 128 G=128 float32 M=17: eager" in out
    assert "separate pass" not in out  # the reference backend has no fused decode kernel to compare
    if ops.triton_interpreter_active():  # the Triton kernels (decode, prefill): fused, and the separate pass too
        rows = mod.measure("cpu", n=48, k=128, ms=(3, 17), reps=1, dtype=torch.float16, backend="triton")
        assert [(r["act"], r["m"]) for r in rows] == [("fp", 3), ("fp", 17), ("int8", 17)]
        assert all(r["input_scale_separate_eager_ms"] > 0 for r in rows if r["act"] == "fp")
        assert [r["m"] for r in rows if "input_perm_separate_eager_ms" in r] == [3]  # prefill always gathers
        out = capsys.readouterr().out
        assert "input scale cost, W4A16 48 x 128 G=128 float16 M=3: eager" in out
        assert "input perm cost, W4A16 48 x 128 G=128 float16 M=3: eager" in out
        assert out.count("separate pass") == 3, out
    # the CUDA extension's switch (timed on a GPU with the extension built): off inside, restored after
    assert ops.CUDA_FUSE_INPUT_PERM
    from minicpm_int4.kernels import w4a16

    with mod._switched(mod.CUDA_PERM_FLAGS + mod.PERM_FLAGS, False):
        assert not ops.CUDA_FUSE_INPUT_PERM and not w4a16.FUSE_INPUT_PERM
    assert ops.CUDA_FUSE_INPUT_PERM and w4a16.FUSE_INPUT_PERM
    # the fused prefill is forced on for its line (compiled kernels default to the pass), then restored
    with mod._switched(mod.SCALE_FLAGS, True):
        assert w4a16.FUSE_INPUT_SCALE is True and w4a16.FUSE_INPUT_SCALE_PREFILL is True
    assert w4a16.FUSE_INPUT_SCALE is True and w4a16.FUSE_INPUT_SCALE_PREFILL is None


def test_result_files_say_which_dispatch_table_auto_ran_on():
    """A GPU run's env carries dispatch.describe() (bench/env.py), and its Markdown says whether
    backend="auto" used the package's table or one made from the same run's bench (the GPU suite's)."""
    from minicpm_int4.bench.report import _env_lines

    env = {"device_name": "NVIDIA H200", "device": "cuda:0"}
    assert not any("dispatch table" in line for line in _env_lines(env))  # a CPU run: none
    env["dispatch_table"] = {"path": "/tmp/t.json", "from_env": True, "this_device_rules": 5}
    assert '- backend="auto": dispatch table made from this run\'s bench, 5 measured rule(s) for this GPU' in \
        "\n".join(_env_lines(env))
    env["dispatch_table"] = {"path": "pkg", "from_env": False, "this_device_rules": 0}
    assert "dispatch table the package's, 0 measured rule(s)" in "\n".join(_env_lines(env))


def test_bench_backends_option_times_only_those_and_fp16(tmp_path, monkeypatch, capsys):
    """`bench --backends`: a focused run (e.g. a measurement variant beside the kernel it would replace)
    times fp16 and the named backends only; one this machine cannot run is skipped with its reason. The
    choice is recorded in the result's config."""
    if not ops.triton_interpreter_active():
        pytest.skip("times the Triton kernels on CPU (TRITON_INTERPRET=1)")
    import minicpm_int4.bench.shapes as shapes_mod

    monkeypatch.setattr(shapes_mod, "all_shapes", lambda models: TINY[1:])
    out = tmp_path / "b"
    rc = main(["bench", "--allow-cpu", "--ms", "1,4,17", "--rep-ms", "1", "--out", str(out),
               "--backends", "w4a16-triton-prefetch,w4a16-triton,w4a16-cuda-ahead2,w4a16-triton-dq,w4a8-triton-flat,"
               "w4a16-triton-rhs,w4a16-triton-trip32"])
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    by_m = {m: {r["backend"] for r in res["rows"] if r["m"] == m} for m in (1, 4, 17)}
    # the prefetching GEMV is an M = 1 variant, the decode kernel's long trip one of 2..16 rows, dequantization +
    # matmul, the prefill tile as x @ W.T and W4A8's flat group loop prefill ones
    assert by_m == {1: {"fp16", "w4a16-triton", "w4a16-triton-prefetch"},
                    4: {"fp16", "w4a16-triton", "w4a16-triton-trip32"},
                    17: {"fp16", "w4a16-triton", "w4a16-triton-dq", "w4a16-triton-rhs", "w4a8-triton-flat"}}
    assert all(r["check"] in ("ok", "unchecked") for r in res["rows"])
    # the host time of a Triton backend's call is also taken with Triton's own launch (kernels/_launch.py)
    for r in res["rows"]:
        triton_row = r["backend"].startswith(("w4a16-triton", "w4a8-triton")) and r["m"] <= 16
        assert (r["host_us_triton_launch"] > 0) if triton_row else r["host_us_triton_launch"] is None, r
    assert "| host us | host us, Triton's launch | GPU us |" in (out / "bench.md").read_text()
    assert res["config"]["backends"] == ["fp16", "w4a16-triton", "w4a16-triton-prefetch", "w4a16-triton-trip32",
                                         "w4a16-triton-dq", "w4a16-triton-rhs", "w4a16-cuda-ahead2", "w4a8-triton-flat"]
    assert "w4a16-cuda-ahead2" in res["skipped"]  # no CUDA extension here: skipped, named
    assert ("[bench] backends: fp16, w4a16-triton, w4a16-triton-prefetch, w4a16-triton-trip32, w4a16-triton-dq, "
            "w4a16-triton-rhs, w4a16-cuda-ahead2, w4a8-triton-flat" in capsys.readouterr().out)
    with pytest.raises(ValueError, match=r"unknown backend\(s\) \['nosuch'\]: choose from fp16,w4a16-triton,"):
        B.select_backends(["nosuch"])


def test_gpu_suite_default_arguments_are_ones_the_commands_take():
    """The suite's default bench and profile arguments (benchmarks/run_gpu_suite.sh, full and SUITE_QUICK)
    parse, and name only known backends and modes: a misspelling would otherwise surface only on a GPU
    machine, after its device minutes are spent."""
    import re
    import shlex

    from minicpm_int4.cli import build_parser

    script = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "run_gpu_suite.sh")).read()
    found = re.findall(r"BENCH_ARGS=\((.*?)\)\n\s*PROFILE_ARGS=\((.*?)\)", script, re.S)
    assert len(found) == 2, "the quick and the full argument sets"
    for bench, profile in found:  # (argparse refuses an unknown backend or mode: SystemExit)
        build_parser().parse_args(["bench", "--out", "x"] + shlex.split(bench))
        build_parser().parse_args(["profile", "--out", "x"] + shlex.split(profile))


def test_gpu_suite_times_every_candidate_the_committed_dispatch_table_takes():
    """A table made from a bench keeps only the candidates that bench timed: the full suite's bench times every
    W4A16 / W4A8 candidate the committed table picks somewhere (its own backend list), so that committing the next
    GPU run's table cannot silently drop a measured win."""
    import json
    import re

    from minicpm_int4.dispatch import PACKAGE_TABLE_PATH

    root = os.path.dirname(os.path.dirname(__file__))
    script = open(os.path.join(root, "benchmarks", "run_gpu_suite.sh")).read()
    full = re.findall(r"--backends (\S+)", script)
    assert len(full) == 1
    timed = set(full[0].split(","))
    table = json.load(open(PACKAGE_TABLE_PATH))
    for device, entry in table["devices"].items():
        for op in ("w4a16", "w4a8"):
            for rule in entry.get(op, []):
                assert f"{op}-{rule['backend']}" in timed, (device, op, rule["backend"])


def test_act_quant_variant_rows_run_the_triton_kernel_with_4_or_16_warps_a_row():
    from minicpm_int4.bench.micro import _act_quant_variant
    from minicpm_int4.kernels import act_quant

    backend, switch = _act_quant_variant("triton-4w")
    assert backend == "triton" and act_quant.ACT_QUANT_WARPS is None
    with switch:
        assert act_quant.ACT_QUANT_WARPS == 4
    assert act_quant.ACT_QUANT_WARPS is None
    backend, switch = _act_quant_variant("triton-16w")
    with switch:
        assert backend == "triton" and act_quant.ACT_QUANT_WARPS == 16
    assert act_quant.ACT_QUANT_WARPS is None
    assert _act_quant_variant("cuda")[0] == "cuda"


def test_plots_draw_the_defaults_and_peers_not_the_measurement_variants():
    # a panel a shape with a line a backend: fp16, our four defaults ("auto" chooses between them) and every peer;
    # the measurement variants (targets.VARIANTS) stay in the tables - a line each made the plots unreadable
    from minicpm_int4.bench import backends, report, targets

    assert report._plotted({"backend": "fp16", "family": "fp16"})
    for b in backends.default_backends():
        row = {"backend": b.name, "family": b.family}
        expect = b.family in ("fp16", "peer") or b.name in ("w4a16-triton", "w4a16-cuda", "w4a8-triton", "w4a8-cuda")
        assert report._plotted(row) == expect, b.name
    variants = {v for v, _, _ in targets.VARIANTS} - set(report.PLOTTED_OURS)
    assert variants and not any(report._plotted({"backend": v, "family": "ours"}) for v in variants)


def test_bench_times_defaults_then_variants_then_peers(monkeypatch):
    # the order a time budget cuts from the end: every shape's fp16 and default rows (the targets', the dispatch
    # table's W4A8 entries) before any measurement variant's, the variants before the peers
    from minicpm_int4.bench import backends, micro
    from minicpm_int4.bench.shapes import LinearShape

    order = []
    monkeypatch.setattr(micro, "_time_shape", lambda shape, b, *a, **k: order.append((shape.n, b.name)))
    monkeypatch.setattr(micro, "_bench_act_quant", lambda *a, **k: [])
    live = [b for b in backends.default_backends() if b.family in ("fp16", "ours")][:8] + [backends.TorchTinyGemm()]
    for b in live:
        monkeypatch.setattr(b, "available", lambda device: None)
    shapes = [LinearShape("m", 64, 128), LinearShape("m", 96, 128)]
    micro.run_microbench(shapes, ms=[1], backends=live, device=torch.device("cpu"), copy_bw_gbps=1.0, progress=False)
    tiers = [0 if b.family == "fp16" or (b.family == "ours" and not b.is_variant) else 1 if b.is_variant else 2
             for b in live]
    tier_of = {b.name: t for b, t in zip(live, tiers)}
    assert {0, 1, 2} <= set(tiers) and len(order) == 2 * len(live)
    assert [tier_of[name] for _, name in order] == sorted(tier_of[name] for _, name in order)
    # within a tier, shape by shape
    assert [n for n, name in order if tier_of[name] == 0] == sorted(n for n, name in order if tier_of[name] == 0)
