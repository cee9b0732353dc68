"""End-to-end latency against fp16 on full-size random-weight models (no download).

For each mode (eager, then, if asked, graphed: the decode step captured in CUDA graphs, static cache +
torch.compile(mode="reduce-overhead")) and each model: build it in fp16 and run it, then patch_model
it to int4 in place and run the same again. Batch 1, a prompt of `prompt_tokens` text tokens plus
one image.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..models import hf_dtype_kwargs
from .env import env_info

IMAGE_TOKEN_ID = 10
MODELS = ("minicpmv4.6", "llama3-v2.5")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_ms(fn, device, reps=3):
    fn()  # warm-up (autotuning, compilation, allocator)
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def build_model(name: str, size: str, dtype: torch.dtype, device: torch.device):
    """(model, inputs dict, description). size "full" = the real default shapes, random weights;
    "tiny" = the test-sized model (harness tests on CPU)."""
    import transformers

    if name == "minicpmv4.6":
        if size == "tiny":
            from ..tiny import build_native

            model = build_native("4_6", "tiny", dtype=dtype, device=device)
        else:
            from ..tiny import _transformers_class

            cfg = _transformers_class("MiniCPMV4_6Config")(image_token_id=IMAGE_TOKEN_ID)
            with torch.device(device):
                model = _transformers_class("MiniCPMV4_6ForConditionalGeneration")._from_config(cfg, **hf_dtype_kwargs(dtype))
            model.eval()
        return model, "MiniCPMV4_6Config() defaults (Qwen3.5 LLM 4096 hidden, vision 768)"
    if name == "llama3-v2.5":
        if size == "tiny":
            cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        else:
            cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                           max_position_embeddings=8192)
        with torch.device(device):
            model = transformers.LlamaForCausalLM._from_config(cfg, **hf_dtype_kwargs(dtype))
        return model.eval(), "Llama-3-8B-shaped LLM of MiniCPM-Llama3-V 2.5 (text-only; 96 resampler tokens as text)"
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def make_inputs(name: str, model, prompt_tokens: int, image_grid: int, device) -> Dict:
    g = torch.Generator().manual_seed(0)
    if name == "minicpmv4.6":
        from ..tiny import image_inputs

        pv, ts, n_img = image_inputs(model, grid=image_grid, device=device)
        vocab = model.config.text_config.vocab_size
        img_id = model.config.image_token_id
        text = torch.randint(img_id + 1, vocab, (prompt_tokens,), generator=g)
        ids = torch.cat([text[:8], torch.full((n_img,), img_id), text[8:]]).unsqueeze(0).to(device)
        return {"input_ids": ids, "pixel_values": pv, "target_sizes": ts}
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens + 96), generator=g).to(device)
    return {"input_ids": ids}


def _vision_fn(name, model, inputs):
    if name != "minicpmv4.6":
        return None
    return lambda: model.model.get_image_features(inputs["pixel_values"], inputs["target_sizes"])


def _graph_decode_step(model, device) -> str:
    """Static KV cache + the decode step compiled with mode="reduce-overhead" (CUDA graphs): through
    transformers' own decode-step compile where it has one (`CompileConfig`, transformers >= 4.48:
    prefill stays eager, only the fixed-shape decode step is compiled - one compile, not two), else
    by compiling `model.forward`. Off CUDA, transformers compiles only when told to
    (`_compile_all_devices`), which the CPU tests of this harness use. Returns what was done."""
    model.generation_config.cache_implementation = "static"
    try:
        from transformers import CompileConfig
    except ImportError:
        CompileConfig = None
    if CompileConfig is None:
        model.forward = torch.compile(model.forward, mode="reduce-overhead")
        return "torch.compile(model.forward, mode='reduce-overhead'), static cache"
    cfg = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
    if device.type != "cuda":
        cfg._compile_all_devices = True
    model.generation_config.compile_config = cfg
    return "transformers' decode-step compile (mode='reduce-overhead'), static cache, eager prefill"


def _ungraph(model) -> None:
    model.generation_config.cache_implementation = None
    if hasattr(model.generation_config, "compile_config"):
        model.generation_config.compile_config = None
    for attr in ("_compiled_call", "_last_compile_config"):
        model.__dict__.pop(attr, None)
    if hasattr(model.forward, "_torchdynamo_orig_callable"):
        model.forward = model.forward._torchdynamo_orig_callable
    torch._dynamo.reset()


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def _cudagraph_skips() -> int:
    """Graphs inductor compiled but did not capture in CUDA graphs (always > 0 off CUDA)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def measure(name: str, model, inputs: Dict, new_tokens: int, device, mode: str, weights: str) -> Dict:
    """One run: vision (eager mode only: graphs change nothing there), prefill, `new_tokens` of
    greedy decoding, peak memory. Graphed: see _graph_decode_step; the run records how it was
    graphed and dynamo's graph breaks, and fails if nothing was compiled."""
    run = {"model": name, "weights": weights, "mode": mode, "weight_bytes": _model_bytes(model)}
    gen = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    try:
        with torch.no_grad():
            if mode == "graphed":
                torch._dynamo.reset()
                run["graphed_by"] = _graph_decode_step(model, device)
                breaks0, skips0 = _graph_breaks(), _cudagraph_skips()  # the counters are process-wide
            vf = _vision_fn(name, model, inputs) if mode == "eager" else None
            run["vision_ms"] = _wall_ms(vf, device) if vf else None
            run["prefill_ms"] = _wall_ms(lambda: model.generate(**inputs, **{**gen, "min_new_tokens": 1, "max_new_tokens": 1}), device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            total = _wall_ms(lambda: model.generate(**inputs, **gen), device, reps=1)
            if mode == "graphed":
                run["graph_breaks"] = _graph_breaks() - breaks0
                run["cudagraph_skips"] = _cudagraph_skips() - skips0
                if "_compiled_call" not in model.__dict__ and not hasattr(model.forward, "_torchdynamo_orig_callable"):
                    raise RuntimeError("transformers did not compile the decode step (is the model's static cache "
                                       "compileable?): this would be an eager run")
            run["generate_ms"] = total
            run["decode_ms_per_token"] = max(0.0, (total - run["prefill_ms"]) / max(1, new_tokens - 1))
            run["tokens_per_s"] = 1e3 / run["decode_ms_per_token"] if run["decode_ms_per_token"] > 0 else None
            run["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    except Exception as e:  # recorded, not hidden: e.g. a cache type that cannot be graphed
        run["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        if mode == "graphed":
            _ungraph(model)
    return run


def trace_decode(model, inputs, device, path: str, top: int = 15) -> str:
    """torch.profiler over a short generate(); writes a Chrome trace; returns the top kernels table."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        model.generate(**inputs, do_sample=False, min_new_tokens=4, max_new_tokens=4)
    prof.export_chrome_trace(path)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def run_profile(models: Sequence[str] = MODELS, size: str = "full", prompt_tokens: int = 512, new_tokens: int = 128,
                image_grid: int = 28, modes: Sequence[str] = ("eager", "graphed"), group_size: int = 128,
                device: Optional[torch.device] = None, dtype: torch.dtype = torch.float16,
                trace_dir: Optional[str] = None, time_budget_s: Optional[float] = None,
                checkpoint: Optional[Callable[[Dict], object]] = None) -> Dict:
    """Past `time_budget_s` (checked between runs), or on Ctrl-C / SIGINT, the remaining runs are
    left out and the result is marked incomplete. `checkpoint(result so far)` is called after each
    run (the CLI writes it to disk: a crash in a later run, say inside a compiler, keeps it)."""
    import time

    t0 = time.monotonic()
    try:
        return _run_profile(models, size, prompt_tokens, new_tokens, image_grid, modes, group_size, device, dtype,
                            trace_dir, t0, time_budget_s, checkpoint)
    except KeyboardInterrupt:
        res = _PARTIAL.pop("result", None) or {"kind": "profile", "runs": []}
        res["incomplete"] = "interrupted"
        return res


_PARTIAL: Dict = {}


def _run_profile(models, size, prompt_tokens, new_tokens, image_grid, modes, group_size, device, dtype, trace_dir,
                 t0, time_budget_s, checkpoint=None):
    import time

    from .. import QuantConfig, patch_model

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"kind": "profile", "env": env_info(device),
              "config": {"models": list(models), "size": size, "prompt_tokens": prompt_tokens, "images": 1,
                         "image_grid_patches": image_grid, "new_tokens": new_tokens, "modes": list(modes),
                         "group_size": group_size, "dtype": str(dtype).replace("torch.", "")},
              "runs": [], "descriptions": {}, "traces": {}}
    _PARTIAL["result"] = result
    from .env import copy_bandwidth_gbps

    result["copy_bandwidth_gbps"] = copy_bandwidth_gbps(device)
    # Every model's eager runs first, then the graphed ones (each rebuilds and re-patches its model):
    # compiling a full-size model takes a minute or more, so when time runs short the fp16 vs int4
    # eager figures of every model are already in.
    for mode in modes:
        # graphed: plain decoders first (Llama's decode step compiles everywhere it was tried; the
        # 4.6 LLM's hybrid linear-attention layers crashed torch 2.11's CPU inductor in the process),
        # so that one crashing compile does not cost the other model's figures
        order = list(models) if mode == "eager" else sorted(models, key=lambda n: n == "minicpmv4.6")
        for name in order:
            if time_budget_s is not None and time.monotonic() - t0 > time_budget_s:
                result["incomplete"] = f"time budget of {time_budget_s:.0f} s reached before {name} {mode}"
                break
            print(f"[profile] building {name} ({size}, random weights) on {device}")
            model, desc = build_model(name, size, dtype, device)
            result["descriptions"][name] = desc
            inputs = make_inputs(name, model, prompt_tokens, image_grid, device)
            for weights in (result["config"]["dtype"], "int4"):
                if time_budget_s is not None and time.monotonic() - t0 > time_budget_s:
                    result["incomplete"] = f"time budget of {time_budget_s:.0f} s reached before {name} {weights} {mode}"
                    break
                patch_s = None
                if weights == "int4":
                    tp = time.perf_counter()
                    report = patch_model(model, QuantConfig(group_size=group_size))
                    _sync(device)
                    patch_s = time.perf_counter() - tp
                    result.setdefault("patch", {}).setdefault(name, report.summary())
                print(f"[profile] {name} {weights} {mode}")
                r = measure(name, model, inputs, new_tokens, device, mode, weights)
                if patch_s is not None:
                    r["patch_model_s"] = patch_s
                if r.get("error"):
                    print(f"[profile]   failed: {r['error']}")
                result["runs"].append(r)
                if checkpoint is not None:
                    checkpoint(result)
                if trace_dir and mode == modes[0]:
                    import os

                    os.makedirs(trace_dir, exist_ok=True)
                    path = os.path.join(trace_dir, f"trace_{name}_{weights}.json")
                    table = trace_decode(model, inputs, device, path)
                    result["traces"][f"{name}/{weights}"] = {"path": path, "top_kernels": table}
                    print(table)
            del model, inputs
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if result.get("incomplete"):
            break
    _PARTIAL.pop("result", None)
    return result
