"""End-to-end latency against fp16 on full-size random-weight models (no download).

For each model: build it in fp16, run eager (and, if asked, with the decode step captured in CUDA
graphs: static cache + torch.compile(mode="reduce-overhead")), then patch_model it to int4 in place
and run the same again. Batch 1, a prompt of `prompt_tokens` text tokens plus one image.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Dict, List, Optional, Sequence

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


def measure(name: str, model, inputs: Dict, new_tokens: int, device, mode: str, weights: str) -> Dict:
    run = {"model": name, "weights": weights, "mode": mode, "weight_bytes": _model_bytes(model)}
    gen = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    try:
        with torch.no_grad():
            if mode == "graphed":
                model.generation_config.cache_implementation = "static"
                model.forward = torch.compile(model.forward, mode="reduce-overhead")
            vf = _vision_fn(name, model, inputs)
            run["vision_ms"] = _wall_ms(vf, device) if vf else None
            run["prefill_ms"] = _wall_ms(lambda: model.generate(**inputs, **{**gen, "min_new_tokens": 1, "max_new_tokens": 1}), device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            total = _wall_ms(lambda: model.generate(**inputs, **gen), device, reps=1)
            run["generate_ms"] = total
            run["decode_ms_per_token"] = max(0.0, (total - run["prefill_ms"]) / max(1, new_tokens - 1))
            run["tokens_per_s"] = 1e3 / run["decode_ms_per_token"] if run["decode_ms_per_token"] > 0 else None
            run["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    except Exception as e:  # recorded, not hidden: e.g. a cache type that cannot be graphed
        run["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        if mode == "graphed":
            model.generation_config.cache_implementation = None
            if hasattr(model.forward, "_torchdynamo_orig_callable"):
                model.forward = model.forward._torchdynamo_orig_callable
            torch._dynamo.reset()
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
                trace_dir: Optional[str] = None, time_budget_s: Optional[float] = None) -> Dict:
    """Past `time_budget_s` (checked between runs), or on Ctrl-C / SIGINT, the remaining runs are
    left out and the result is marked incomplete."""
    import time

    t0 = time.monotonic()
    try:
        return _run_profile(models, size, prompt_tokens, new_tokens, image_grid, modes, group_size, device, dtype,
                            trace_dir, t0, time_budget_s)
    except KeyboardInterrupt:
        res = _PARTIAL.pop("result", None) or {"kind": "profile", "runs": []}
        res["incomplete"] = "interrupted"
        return res


_PARTIAL: Dict = {}


def _run_profile(models, size, prompt_tokens, new_tokens, image_grid, modes, group_size, device, dtype, trace_dir,
                 t0, time_budget_s):
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
    for name in models:
        if time_budget_s is not None and time.monotonic() - t0 > time_budget_s:
            result["incomplete"] = f"time budget of {time_budget_s:.0f} s reached before {name}"
            break
        print(f"[profile] building {name} ({size}, random weights) on {device}")
        model, desc = build_model(name, size, dtype, device)
        result["descriptions"][name] = desc
        inputs = make_inputs(name, model, prompt_tokens, image_grid, device)
        for weights in (result["config"]["dtype"], "int4"):
            if weights == "int4":
                report = patch_model(model, QuantConfig(group_size=group_size))
                result.setdefault("patch", {})[name] = report.summary()
            for mode in modes:
                if time_budget_s is not None and time.monotonic() - t0 > time_budget_s:
                    result["incomplete"] = f"time budget of {time_budget_s:.0f} s reached before {name} {weights} {mode}"
                    break
                print(f"[profile] {name} {weights} {mode}")
                r = measure(name, model, inputs, new_tokens, device, mode, weights)
                if r.get("error"):
                    print(f"[profile]   failed: {r['error']}")
                result["runs"].append(r)
            if trace_dir:
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
    _PARTIAL.pop("result", None)
    return result
