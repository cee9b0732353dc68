"""End-to-end latency against fp16 on full-size random-weight models (no download).

For each mode and each model: build it in fp16 and run it, then patch_model it to int4 in place and
run the same again. Batch 1, a prompt of `prompt_tokens` text tokens plus one image. The modes, in the
order they run:
- eager: transformers' generate() as it comes (dynamic cache, every kernel launched from Python);
- cudagraph: static cache, the decode step captured by hand in one CUDA graph and replayed
  (_CapturedDecode: no compile, so it costs seconds, and fp16 and int4 run the same kernels apart from
  the Linears');
- graphed: static cache + transformers' own decode-step compile, torch.compile(mode="reduce-overhead")
  (inductor's fusions and CUDA graphs; a minute or more of compile per model and weight type).
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
MODES = ("eager", "cudagraph", "graphed")  # (the order they run in: the graphed mode compiles, for minutes)


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
            cls = _transformers_class("MiniCPMV4_6ForConditionalGeneration")  # (outside the device: shapes.py says why)
            with torch.device(device):
                model = cls._from_config(cfg, **hf_dtype_kwargs(dtype))
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
        cls = transformers.LlamaForCausalLM  # (resolved outside the device context: shapes._causal_lm_shapes says why)
        with torch.device(device):
            model = cls._from_config(cfg, **hf_dtype_kwargs(dtype))
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
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pv, "target_sizes": ts}
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens + 96), generator=g).to(device)
    # the mask a tokenizer gives: generate() makes one itself only for a forward whose signature names it, and the
    # cudagraph mode's forward takes **kwargs - transformers 4.44's static-cache step then read attention_mask.ndim
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


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
    # (transformers 4.48 compiles the step on CUDA only, with no switch for other devices: compiled here off CUDA)
    if CompileConfig is None or (device.type != "cuda" and not hasattr(CompileConfig, "_compile_all_devices")):
        model.forward = torch.compile(model.forward, mode="reduce-overhead")
        return "torch.compile(model.forward, mode='reduce-overhead'), static cache"
    cfg = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
    if device.type != "cuda":
        cfg._compile_all_devices = True
    model.generation_config.compile_config = cfg
    return "transformers' decode-step compile (mode='reduce-overhead'), static cache, eager prefill"


def _ungraph(model) -> None:
    model.generation_config.cache_implementation = None
    model.generation_config.disable_compile = False
    if hasattr(model.generation_config, "compile_config"):  # this transformers' default (4.48 refuses None)
        model.generation_config.compile_config = type(model.generation_config)().compile_config
    for attr in ("_compiled_call", "_last_compile_config", "get_compiled_call"):
        model.__dict__.pop(attr, None)
    if hasattr(model.forward, "_torchdynamo_orig_callable"):
        model.forward = model.forward._torchdynamo_orig_callable
    torch._dynamo.reset()


CHECK_TOKENS = 16  # the captured decode's first tokens compared with an eager decode's
WARMUP_STEPS = 2  # eager decode steps before the capture (autotuning, lazy allocations, cuBLAS handles)


def _hand_graph_setup(model) -> str:
    """The "cudagraph" mode: static cache, transformers' own compile of the decode step turned off (on CUDA it
    compiles by itself once the cache is static), and the step captured by _CapturedDecode."""
    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = True
    # transformers 4.48 has no disable_compile: on CUDA its generate() compiles a static cache's decode step
    # whatever the config says, through get_compiled_call - which gives the plain call here
    model.get_compiled_call = lambda *args, **kwargs: model.__call__
    return "the decode step captured by hand in one CUDA graph (no compile), static cache, eager prefill"


def _static_copy(v):
    if torch.is_tensor(v):
        return v.clone()
    if isinstance(v, dict):
        return {k: _static_copy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_static_copy(x) for x in v)
    return v


def _bind(static, new, path: str) -> None:
    """Copy a decode call's tensors into the captured call's buffers; anything else must be what the capture
    saw (the same cache object, the same flags): a graph replays the capture's shapes and Python values."""
    if torch.is_tensor(static):
        meta = (static.shape, static.dtype, static.device)
        if not torch.is_tensor(new) or (new.shape, new.dtype, new.device) != meta:
            got = f"{tuple(new.shape)} {new.dtype}" if torch.is_tensor(new) else type(new).__name__
            raise RuntimeError(f"decode-step argument {path} is {got}, the captured step had "
                               f"{tuple(static.shape)} {static.dtype}: a CUDA graph replays fixed shapes")
        static.copy_(new)
    elif isinstance(static, dict):
        if not isinstance(new, dict) or list(new) != list(static):
            raise RuntimeError(f"decode-step argument {path} changed its keys since the capture")
        for k in static:
            _bind(static[k], new[k], f"{path}.{k}")
    elif isinstance(static, (list, tuple)):
        if type(new) is not type(static) or len(new) != len(static):
            raise RuntimeError(f"decode-step argument {path} changed its length since the capture")
        for i, (a, b) in enumerate(zip(static, new)):
            _bind(a, b, f"{path}[{i}]")
    elif static is not new and not (type(static) is type(new) and isinstance(new, (bool, int, float, str))
                                    and static == new):
        raise RuntimeError(f"decode-step argument {path} is {new!r}, the captured step had {static!r}")


def _state_of(obj, path: str, out: Dict, depth: int = 0) -> Dict:
    """What a replay cannot redo, in a cache object: which tensor each attribute holds (its address) and
    its Python numbers, through lists, dicts and plain objects (its layers)."""
    if torch.is_tensor(obj):
        out[path] = ("tensor", obj.data_ptr(), tuple(obj.shape))
    elif isinstance(obj, (bool, int, float)):
        out[path] = ("value", obj)
    elif depth < 4:
        if isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                _state_of(v, f"{path}[{i}]", out, depth + 1)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                _state_of(v, f"{path}[{k!r}]", out, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type, torch.device)):
            for k, v in vars(obj).items():
                _state_of(v, f"{path}.{k}", out, depth + 1)
    return out


class _CapturedDecode:
    """model.forward for generate() in the "cudagraph" mode: the prefill (more than one token) runs eagerly;
    the first WARMUP_STEPS decode steps run eagerly too (on a side stream on CUDA, as torch.cuda.graph asks),
    each checked to leave the cache holding the same tensors and Python numbers (else a replay would re-run
    the capture's step against stale state: refused, naming what moved); the next step is captured in one
    torch.cuda.CUDAGraph with its own copies of the step's tensor arguments (input ids, masks, positions:
    whatever this transformers passes), and every later step copies its arguments into them and replays.
    generate()'s own loop (logits processing, stopping, mask preparation) stays in Python, as with
    transformers' compiled decode step. Off CUDA nothing can be captured: the replay calls forward with the
    same buffers (the harness's CPU tests; reported as emulated)."""

    def __init__(self, forward, device: torch.device, warmup: int = WARMUP_STEPS):
        self.forward, self.device, self.warmup = forward, device, warmup
        self.decode_calls = 0
        self.graph = None
        self.static_kwargs = self.static_out = None
        self.capture_ms = None
        self.first_replay_t = None
        self.step_ms: List[float] = []
        self._events: List = []

    def __call__(self, *args, **kwargs):
        ids = kwargs.get("input_ids")
        if args or ids is None or ids.shape[-1] != 1:
            return self.forward(*args, **kwargs)
        self.decode_calls += 1
        if self.decode_calls <= self.warmup:
            return self._eager_step(kwargs)
        if self.graph is None:
            self._capture(kwargs)
            return self._replay(kwargs, timed=False)
        return self._replay(kwargs, timed=True)

    def _eager_step(self, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        before = _state_of(cache, "cache", {})
        if self.device.type == "cuda":
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self.forward(**kwargs)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            out = self.forward(**kwargs)
        after = _state_of(cache, "cache", {})
        moved = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
        if moved:
            raise RuntimeError(f"{type(cache).__name__} is not replayable: an eager decode step changed "
                               f"{', '.join(moved[:4])}{' ...' if len(moved) > 4 else ''} (a new tensor or a Python "
                               "number), which a CUDA graph would replay as it was at the capture")
        return out

    def _capture(self, kwargs) -> None:
        self.static_kwargs = _static_copy(kwargs)
        if self.device.type != "cuda":
            self.graph = "emulated"
            return
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.static_out = self.forward(**self.static_kwargs)
        except Exception as e:  # (a failure inside the block makes ending the capture fail too: name the first)
            first = e.__context__ or e
            raise RuntimeError(f"the decode step could not be captured in a CUDA graph: {type(first).__name__}: "
                               f"{str(first)[:200]}") from e
        torch.cuda.synchronize(self.device)
        self.capture_ms = (time.perf_counter() - t0) * 1e3
        self.graph = graph

    def _replay(self, kwargs, timed: bool):
        _bind(self.static_kwargs, kwargs, "")
        if timed and self.first_replay_t is None:
            _sync(self.device)
            self.first_replay_t = time.perf_counter()
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            out = self.forward(**self.static_kwargs)
            if timed:
                self.step_ms.append((time.perf_counter() - t0) * 1e3)
            return out
        if timed:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
            self.graph.replay()
            ev[1].record()
            self._events.append(ev)
        else:
            self.graph.replay()
        return self.static_out

    def replay_stats(self) -> Dict:
        """After generate() returned: steps replayed, the steady decode wall time per token (first timed
        replay to the end, generate's loop included; warm-up and capture left out) and the graph's own
        GPU time per step (median of CUDA events around each replay)."""
        _sync(self.device)
        n = len(self._events) or len(self.step_ms)
        if not n:
            raise RuntimeError(f"no decode step was replayed: {self.decode_calls} decode step(s), {self.warmup} eager "
                               "warm-up and one capture come first (ask for more new tokens)")
        if self._events:
            self.step_ms = [a.elapsed_time(b) for a, b in self._events]
        return {"replayed_steps": n, "decode_ms_per_token": (time.perf_counter() - self.first_replay_t) * 1e3 / n,
                "graph_step_ms": statistics.median(self.step_ms), "capture_ms": self.capture_ms,
                "emulated": self.device.type != "cuda"}


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
            elif mode == "cudagraph":
                run["graphed_by"] = _hand_graph_setup(model)
            vf = _vision_fn(name, model, inputs) if mode == "eager" else None
            run["vision_ms"] = _wall_ms(vf, device) if vf else None
            run["prefill_ms"] = _wall_ms(lambda: model.generate(**inputs, **{**gen, "min_new_tokens": 1, "max_new_tokens": 1}), device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if mode == "cudagraph":
                return _measure_captured(run, model, inputs, gen, device)
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
        if mode in ("graphed", "cudagraph"):
            _ungraph(model)
    return run


def _measure_captured(run: Dict, model, inputs: Dict, gen: Dict, device) -> Dict:
    """The "cudagraph" mode's decode: one generate() with the step captured by hand (_CapturedDecode); its
    tokens are checked against an eager generate() on the same static cache for the first CHECK_TOKENS
    (the same kernels on the same inputs: they should agree; where they do not, the run says from where)."""
    step = _CapturedDecode(model.forward, device)
    model.forward = step
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = model.generate(**inputs, **gen)
        _sync(device)
        run["generate_ms"] = (time.perf_counter() - t0) * 1e3
        run.update(step.replay_stats())
    finally:
        model.__dict__.pop("forward", None)
    run["tokens_per_s"] = 1e3 / run["decode_ms_per_token"] if run["decode_ms_per_token"] > 0 else None
    run["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    n = min(CHECK_TOKENS, gen["max_new_tokens"])
    with torch.no_grad():
        ref = model.generate(**inputs, **{**gen, "min_new_tokens": n, "max_new_tokens": n})
    new_ref, new_seq = ref[0, -n:].tolist(), seq[0, -gen["max_new_tokens"]:][:n].tolist()
    same = next((i for i, (a, b) in enumerate(zip(new_ref, new_seq)) if a != b), n)
    run["tokens_checked"], run["tokens_same_as_eager"] = n, same
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
                image_grid: int = 28, modes: Sequence[str] = MODES, group_size: int = 128,
                device: Optional[torch.device] = None, dtype: torch.dtype = torch.float16,
                trace_dir: Optional[str] = None, time_budget_s: Optional[float] = None,
                checkpoint: Optional[Callable[[Dict], object]] = None, w4a8: bool = False,
                fuse: bool = True) -> Dict:
    """Past `time_budget_s` (checked between runs), or on Ctrl-C / SIGINT, the remaining runs are
    left out and the result is marked incomplete. `checkpoint(result so far)` is called after each
    run (the CLI writes it to disk: a crash in a later run, say inside a compiler, keeps it).
    w4a8: after each model's int4 run in eager mode, one more eager run ("int4-w4a8") of the same int4
    layers with int8 activations (every QuantLinear's act = "int8": the same weights, so no re-patch):
    what W4A8 changes end to end, the vision encoder and the prefill; its decode rows run W4A16 as
    ever (M < ops.W4A8_MIN_M), so it decodes only W4A8_PROFILE_TOKENS tokens.
    fuse: after each model's int4 run in every mode, one more ("int4-fused") of the same layers after
    minicpm_int4.fuse_projections (q / k / v, gate / up, ... one GEMM each at one-token decode: fusion.py; in
    graphed mode the compiled decode step holds the stacked GEMMs)."""
    import time

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown profile mode(s) {unknown}; choose from {MODES}")
    modes = sorted(dict.fromkeys(modes), key=MODES.index)
    t0 = time.monotonic()
    try:
        return _run_profile(models, size, prompt_tokens, new_tokens, image_grid, modes, group_size, device, dtype,
                            trace_dir, t0, time_budget_s, checkpoint, w4a8, fuse)
    except KeyboardInterrupt:
        res = _PARTIAL.pop("result", None) or {"kind": "profile", "runs": []}
        res["incomplete"] = "interrupted"
        return res


_PARTIAL: Dict = {}


W4A8_PROFILE_TOKENS = 8  # decoded by the "int4-w4a8" run: its decode is W4A16's, timed by the "int4" run


def _set_act(model, act) -> int:
    """Every QuantLinear's activations (None: W4A16, "int8": W4A8); how many layers."""
    from ..qlinear import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.act = act
    return len(layers)


def _run_profile(models, size, prompt_tokens, new_tokens, image_grid, modes, group_size, device, dtype, trace_dir,
                 t0, time_budget_s, checkpoint=None, w4a8=False, fuse=True):
    import time

    from .. import QuantConfig, patch_model
    from ..fusion import fuse_projections

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"kind": "profile", "env": env_info(device),
              "config": {"models": list(models), "size": size, "prompt_tokens": prompt_tokens, "images": 1,
                         "image_grid_patches": image_grid, "new_tokens": new_tokens, "modes": list(modes),
                         "group_size": group_size, "dtype": str(dtype).replace("torch.", ""), "w4a8": w4a8,
                         "fuse": fuse},
              "runs": [], "descriptions": {}, "traces": {}}
    _PARTIAL["result"] = result
    from .env import copy_bandwidth_gbps

    result["copy_bandwidth_gbps"] = copy_bandwidth_gbps(device)
    # Every model's eager runs first, then the hand-captured ones, then the compiled ones (each mode rebuilds
    # and re-patches its model): compiling a full-size model takes a minute or more, so when time runs
    # short the fp16 vs int4 eager and CUDA-graph figures of every model are already in.
    # (mode, the models in order, the weight runs of each): every mode's fp16 and int4 runs, which the issue's
    # tables need, come before the graphed mode's int4-fused ones, a compile each, which get a pass of their own
    passes = []
    for mode in modes:
        # graphed: plain decoders first (Llama's decode step compiles everywhere it was tried; the
        # 4.6 LLM's hybrid linear-attention layers crashed torch 2.11's CPU inductor in the process),
        # so that one crashing compile does not cost the other model's figures
        order = list(models) if mode != "graphed" else sorted(models, key=lambda n: n == "minicpmv4.6")
        weight_runs = ([result["config"]["dtype"], "int4"] + (["int4-fused"] if fuse and mode != "graphed" else [])
                       + (["int4-w4a8"] if w4a8 and mode == "eager" else []))
        passes.append((mode, order, weight_runs))
        if fuse and mode == "graphed":
            passes.append((mode, order, ["int4-fused"]))
    for mode, order, weight_runs in passes:
        for name in order:
            if time_budget_s is not None and time.monotonic() - t0 > time_budget_s:
                what = f"{name} int4-fused" if weight_runs == ["int4-fused"] else name
                result["incomplete"] = f"time budget of {time_budget_s:.0f} s reached before {what} {mode}"
                break
            print(f"[profile] building {name} ({size}, random weights) on {device}")
            model, desc = build_model(name, size, dtype, device)
            result["descriptions"][name] = desc
            inputs = make_inputs(name, model, prompt_tokens, image_grid, device)
            for weights in weight_runs:
                if time_budget_s is not None and time.monotonic() - t0 > time_budget_s:
                    result["incomplete"] = f"time budget of {time_budget_s:.0f} s reached before {name} {weights} {mode}"
                    break
                patch_s = None
                if weights == "int4-fused" and weight_runs[0] == weights:  # a pass of its own: patched here
                    patch_model(model, QuantConfig(group_size=group_size))
                if weights == "int4":
                    tp = time.perf_counter()
                    report = patch_model(model, QuantConfig(group_size=group_size))
                    _sync(device)
                    patch_s = time.perf_counter() - tp
                    result.setdefault("patch", {}).setdefault(name, report.summary())
                tokens = new_tokens
                fused = None
                if weights == "int4-fused":  # the same int4 layers, siblings stacked (no re-patch)
                    fused = fuse_projections(model)
                    _sync(device)
                if weights == "int4-w4a8":  # the same int4 layers, int8 activations from W4A8_MIN_M rows on
                    _set_act(model, "int8")
                    tokens = min(new_tokens, W4A8_PROFILE_TOKENS)
                print(f"[profile] {name} {weights} {mode}")
                r = measure(name, model, inputs, tokens, device, mode, weights)
                if weights == "int4-w4a8":
                    _set_act(model, None)
                    r["new_tokens"] = tokens
                if patch_s is not None:
                    r["patch_model_s"] = patch_s
                if fused is not None:
                    r["fused_groups"] = len(fused.groups)
                    r["launches_saved_per_token"] = fused.launches_saved
                    r["stacked_calls"] = sum(g.calls for g in fused.groups)  # > 0: fusion ran (eager, captured)
                    r["groups_in_graph"] = sum(g.in_graph for g in fused.groups)  # > 0: in a compiled step (graphed)
                    r["groups_ran_stacked"] = sum(bool(g.calls or g.in_graph) for g in fused.groups)
                    r["fusion_off"] = sorted({g.reason for g in fused.groups if not g.active})
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
