"""`minicpm-int4` command line: demo | quantize | eval | bench | profile.

    minicpm-int4 demo                 build a small random-weight MiniCPM-V 4.6, patch it, compare
    minicpm-int4 quantize MODEL OUT   from_pretrained(MODEL) -> patch_model -> save_quantized(OUT)
    minicpm-int4 eval MODEL QDIR      KL / top-1 / perplexity / per-layer error of QDIR vs MODEL
    minicpm-int4 bench                kernel microbenchmarks vs fp16 and peers (JSON, Markdown, PNG)
    minicpm-int4 profile              end-to-end latency vs fp16 on full-size random-weight models
    minicpm-int4 env                  versions, devices, available backends and why not, auto's picks
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .config import METHODS, PARTS, SENSITIVITIES
from .models import hf_dtype_kwargs


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device, reps=5):
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps * 1e3


DEMO_MODELS = {"4.6": "MiniCPM-V 4.6 (native transformers classes)",
               "llama3-v2.5": "MiniCPM-Llama3-V 2.5 layout (remote code: Llama LLM, SigLIP, resampler)",
               "2.6": "MiniCPM-V 2.6 layout (remote code: Qwen2 LLM, SigLIP, resampler)"}


def _demo_model(args, device, dtype):
    """(model, description, forward(), generate() -> new tokens) for the demo. Without --model it is
    the native 4.6, or where transformers has no native class (4.x) the 2.6 remote-code layout."""
    from .tiny import NativeModelUnavailable, build_native, build_remote_layout, prompt_with_image, remote_inputs

    name = args.model or "4.6"
    gen_kw = dict(max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=args.new_tokens)
    if name == "4.6":
        try:
            model = build_native("4_6", size=args.size, dtype=dtype, device=device, seed=args.seed)
        except NativeModelUnavailable as e:
            if args.model:
                raise
            print(f"{e}: the demo runs the {DEMO_MODELS['2.6']} instead")
            name = "2.6"
    if name == "4.6":
        ids, pv, ts = (t.to(device) for t in prompt_with_image(model, text_len=16, seed=args.seed + 1))
        inputs = dict(input_ids=ids, pixel_values=pv, target_sizes=ts)
        return (model, DEMO_MODELS[name], lambda: model(**inputs).logits,
                lambda: model.generate(**inputs, **gen_kw)[:, ids.shape[1]:])
    model = build_remote_layout("llama" if name == "llama3-v2.5" else "qwen2", dtype=dtype, seed=args.seed,
                                size=args.size).to(device)
    ids, pv = (t.to(device) for t in remote_inputs(model, text_len=24, seed=args.seed + 1))
    return model, DEMO_MODELS[name], lambda: model(ids, pv).logits, lambda: model.generate(ids, pv, **gen_kw)


def cmd_demo(args) -> int:
    from . import QuantConfig, patch_model

    device = torch.device(_device(args.device))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model, what, forward, generate = _demo_model(args, device, dtype)
    print(f"minicpm_int4 demo: random-weight {what} ({args.size}), {args.dtype}, device {device}")

    with torch.no_grad():
        ref_logits = forward().float()
        ref_gen = generate()
        fp_ms = _time_ms(forward, device) if device.type == "cuda" else None
    bytes_fp = _model_bytes(model)

    config = QuantConfig(group_size=args.group_size, method=args.method)
    report = patch_model(model, config)
    print(report)
    bytes_q = _model_bytes(model)

    with torch.no_grad():
        q_logits = forward().float()
        q_gen = generate()
        q_ms = _time_ms(forward, device) if device.type == "cuda" else None
    # one GEMM for each set of sibling projections at one-token decode (fusion.py): the same greedy tokens
    from .fusion import fuse_projections

    fusion = fuse_projections(model)
    with torch.no_grad():
        f_gen = generate()
    stacked = sum(g.calls for g in fusion.groups)
    fused_same = f_gen.shape == q_gen.shape and bool(torch.equal(f_gen, q_gen))
    rel = ((q_logits - ref_logits).norm() / ref_logits.norm()).item()
    top1 = (q_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    n = min(ref_gen.shape[1], q_gen.shape[1])
    gen_agree = (ref_gen[:, :n] == q_gen[:, :n]).float().mean().item() if n else float("nan")
    first_diff = next((i for i in range(n) if ref_gen[0, i] != q_gen[0, i]), None)
    mib = 2**20
    print()
    print(f"weight memory (all parameters and buffers): {args.dtype} {bytes_fp / mib:.2f} MiB -> int4 {bytes_q / mib:.2f} MiB "
          f"({bytes_fp / bytes_q:.2f}x smaller; Linear weights {report.bytes_before / mib:.2f} -> {report.bytes_after / mib:.2f} MiB)")
    print(f"prompt logits: relative error {rel:.4f}, top-1 agreement {top1 * 100:.1f}% over {q_logits.shape[1]} positions")
    print(f"greedy generation ({n} new tokens): {gen_agree * 100:.1f}% tokens identical"
          + (f", first difference at token {first_diff}" if first_diff is not None else ", identical"))
    print(f"  {args.dtype}: {ref_gen[0].tolist()}")
    print(f"  int4: {q_gen[0].tolist()}")
    print(f"fuse_projections: {len(fusion.groups)} group(s) of sibling int4 projections, one GEMM each at one-token "
          f"decode ({fusion.launches_saved} launch(es) fewer a token, {stacked} stacked call(s) in this generation); "
          f"its tokens {'are the unfused int4 model' + chr(39) + 's' if fused_same else 'DIFFER from the unfused int4 model' + chr(39) + 's'}")
    spread = ref_logits.std(-1).mean().item()
    print(f"note: random weights give nearly flat logits (mean std {spread:.3f} across the vocabulary), so a small "
          "perturbation flips the top-1 token; quality on trained weights: benchmarks/results/cpu/minilm_quality.md")
    if fp_ms is not None:
        print(f"forward (prompt + image) on {torch.cuda.get_device_name(device)}: {args.dtype} {fp_ms:.2f} ms, int4 {q_ms:.2f} ms")
    else:
        print("timings: skipped on CPU (the CPU path is the PyTorch reference, not a fast kernel)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"report": report.to_dict(), "bytes_fp": bytes_fp, "bytes_int4": bytes_q, "logits_rel_err": rel,
                       "top1_agreement": top1, "generation_agreement": gen_agree, "fp_ms": fp_ms, "int4_ms": q_ms,
                       "fused_groups": len(fusion.groups), "fused_launches_saved_per_token": fusion.launches_saved,
                       "fused_stacked_calls": stacked, "fused_generation_same": fused_same}, f, indent=2)
    return 0


class CLIError(Exception):
    """A user error (a path that does not load, a class transformers lacks): main prints the message
    as one line and exits 2 instead of a traceback (MINICPM_INT4_TRACEBACK=1 shows it)."""


def _checkpoint_dir(name: str, what: str, weights: bool = True) -> str:
    """The local folder of checkpoint `name` (hub.checkpoint_dir: a folder as it is; a Hugging Face Hub model id
    fetched, with progress, or found in the cache), with a line saying so when it is fetched; a CLIError where
    there is neither."""
    from .hub import CheckpointNotFoundError, checkpoint_dir, looks_like_repo_id

    if not os.path.isdir(name) and looks_like_repo_id(name):
        print(f"{what} {name}: fetching {'its files' if weights else 'its configs'} from the Hugging Face Hub "
              "(or its cache)", file=sys.stderr)
    try:
        return checkpoint_dir(name, weights=weights)
    except CheckpointNotFoundError as e:
        raise CLIError(f"{what} {e}") from e


def _carry_support_files(src: str, out: str) -> None:
    """Copy MODEL's tokenizer / processor / chat template / remote code / licence files beside the int4
    checkpoint (hub.copy_support_files), and say which."""
    from .hub import copy_support_files

    copied = copy_support_files(src, out)
    if copied:
        names = ", ".join(copied[:6]) + (f", ... ({len(copied) - 6} more)" if len(copied) > 6 else "")
        print(f"copied {len(copied)} file(s) the model's processor, tokenizer or code need from {src}: {names}")


def _device(name) -> str:
    """--device, or cuda when there is one, else cpu; a device this torch cannot use is a CLIError."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name}: not a device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: torch {torch.__version__} sees no CUDA device"
                           + ("" if torch.version.cuda else " (a CPU build of torch)"))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise CLIError(f"--device {name}: the int4 layers run on cuda or cpu")
    return name


def _model_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise CLIError(f"--model-class {name}: transformers {transformers.__version__} has no such model class "
                       "(remote-code MiniCPM-V 2.x / o-2.6: --model-class AutoModel --trust-remote-code)")
    return cls


def _from_pretrained(what: str, load, path: str, *args, **kwargs):
    """load(path, ...) with the errors a wrong path, a missing trust_remote_code or a config of another
    model raise (OSError / ValueError / ImportError from transformers) turned into one CLIError."""
    try:
        return load(path, *args, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise CLIError(f"cannot load the {what} from {path!r}: {e}") from e


def _default_model_class(args) -> str:
    """--model-class when not given: AutoModel for a remote-code checkpoint (MiniCPM-V 2.x / o-2.6), else
    AutoModelForImageTextToText (the native 4.6 / 4.7 / OCR)."""
    return "AutoModel" if _is_remote_code(args) else "AutoModelForImageTextToText"


def _is_remote_code(args) -> bool:
    """Whether MODEL loads through its own code: an auto_map in its config.json, and a config class that
    came from that code (transformers_modules), not from transformers. A checkpoint that ships remote code
    beside a class transformers has natively loads the native class without --trust-remote-code, and is
    native here too."""
    import transformers

    cfg = _from_pretrained("config", transformers.AutoConfig.from_pretrained, args.model,
                           trust_remote_code=args.trust_remote_code)
    return bool(getattr(cfg, "auto_map", None)) and not type(cfg).__module__.startswith("transformers.")


def _load_model(args, dtype, device):
    if args.model_class is None:
        args.model_class = _default_model_class(args)
    cls = _model_class(args.model_class)
    print(f"loading {args.model} with {args.model_class} ({args.dtype}) on {device}", file=sys.stderr)
    model = _from_pretrained(f"model ({args.model_class})", cls.from_pretrained, args.model, **hf_dtype_kwargs(dtype),
                             trust_remote_code=args.trust_remote_code)
    return model.to(device).eval()


def _load_tokenizer(args):
    import transformers

    return _from_pretrained("tokenizer", transformers.AutoTokenizer.from_pretrained, args.model,
                            trust_remote_code=args.trust_remote_code)


def _existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path!r} is not a file" + ("" if os.path.exists(path) else " (it does not exist)"))
    return path


def _positive_int(s: str, minimum: int = 1) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"{s!r}: must be {'a positive' if minimum == 1 else 'a non-negative'} integer")
    return v


def _nonnegative_int(s: str) -> int:
    return _positive_int(s, minimum=0)


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{s!r}: must be a positive number")
    return v


def _output_dir(path: str) -> str:
    """quantize's OUT, checked before the model loads and quantizes for minutes (checkpoint.check_output_dir:
    not a file, not a folder of other model weights such as MODEL's own)."""
    from .checkpoint import check_output_dir

    try:
        check_output_dir(path, what="OUT")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("OUT: ")) from None
    return path


def _read_lines(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_IMAGE_PROMPT = "Describe this image in detail."


def _image_files(paths, flag: str) -> list:
    """Image files, and the images (by suffix, sorted) of any folder given."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES)
                           and os.path.isfile(os.path.join(path, f)))
            if not found:
                raise CLIError(f"{flag} {path}: the folder has no image ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise CLIError(f"{flag} {path}: no such file or folder")
    return files


def _open_image(path, flag: str, verify_only: bool = False):
    """The image at `path` as RGB; with verify_only, only checked (the header and the file's structure,
    no decoding: every image is checked before the model loads, so an unreadable file fails in a second,
    naming itself, while the pixels are decoded one image at a time later)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise CLIError(f"{flag} needs Pillow to read images (pip install pillow)") from None
    try:
        with Image.open(path) as im:
            if verify_only:
                im.verify()
                return path
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # verify() raises SyntaxError too
        raise CLIError(f"{flag}: cannot read {str(path)!r} as an image: {e}") from None


def _load_processor(args, flag: str):
    """The checkpoint's own processor (image slicing, placeholder tokens, chat template): the same inputs
    the model gets in use."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, ImportError, AttributeError, TypeError) as e:
        raise CLIError(f"{flag} needs the model's processor, which does not load from {args.model!r}: "
                       f"{type(e).__name__}: {e}".rstrip() + " (the MiniCPM-V 4.x processors also need torchvision)") from e


def _image_batches(processor, images, prompts, device, dtype, flag: str = "--calibration-images"):
    """One batch per image (a path, decoded here, or a PIL image): a user turn of the image and a prompt
    (the calibration lines in turn, or a generic request for a description), through the processor's
    chat template when it has one, else its image token before the prompt. Floating tensors (pixel
    values) take the model's dtype. Not cut at --max-length: a cut would drop image placeholders that
    the pixels must fill."""
    batches = []
    for i, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            image = _open_image(image, flag)
        prompt = prompts[i % len(prompts)] if prompts else DEFAULT_IMAGE_PROMPT
        if getattr(processor, "chat_template", None):
            msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
            enc = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                return_tensors="pt")
        elif getattr(processor, "image_token", None):
            enc = processor(images=[image], text=[f"{processor.image_token}\n{prompt}"], return_tensors="pt")
        else:
            raise CLIError(f"the processor {type(processor).__name__} has neither a chat "
                           "template nor an image token to place the image in the prompt")
        batches.append({k: (v.to(device=device, dtype=dtype) if torch.is_floating_point(v) else v.to(device))
                        for k, v in enc.items() if isinstance(v, torch.Tensor)})
    return batches


def _images_and_processor(args, paths, flag: str, limit=None):
    """(image paths, processor) for `flag`'s paths, or (None, None) without them; checked and loaded before
    the model, so that a bad image or a missing processor fails in a second."""
    if not paths:
        return None, None
    files = _image_files(paths, flag)[:limit]
    if _is_remote_code(args):
        raise CLIError(f"{flag} works with the native MiniCPM-V 4.x processors; a remote-code model "
                       "(MiniCPM-V 2.x / o-2.6) has a processor and a forward of its own: calibrate or compare it in "
                       "Python on batches its forward takes (calibrate(model, batches) and compare_models(ref, quant, "
                       "batches) call model(**batch) on each dict), then patch_model(model, config, calibration=...)")
    return [_open_image(f, flag, verify_only=True) for f in files], _load_processor(args, flag)


def _prompt_batches(tok, lines, processor, images, device, dtype, max_length, flag: str):
    """The text lines' batches, then one per image (its prompt: the lines in turn), as quantize
    calibrates and eval compares."""
    batches = _text_batches(tok, lines, device, max_length) if lines else []
    if images:
        batches += _image_batches(processor, images, lines, device, dtype, flag)
    return batches


def _text_batches(tokenizer, lines, device, max_length):
    return [{"input_ids": tokenizer(line, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"].to(device)}
            for line in lines]


def _peak_memory(device) -> str:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    msg = f"process peak RSS {rss:.0f} MiB"
    if torch.device(device).type == "cuda":
        msg += f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return msg


def cmd_quantize(args) -> int:
    from . import QuantConfig, calibrate, patch_model, save_quantized
    from .checkpoint import load_pretrained_quantized

    dtype = _dtype(args.dtype)
    device = _device(args.device)
    if args.method == "gptq" and not (args.calibration or args.calibration_images):
        raise CLIError("--method gptq fits each layer to its calibration inputs: give --calibration prompts.txt "
                       "and/or --calibration-images")
    # the config first: whatever it refuses, it refuses before minutes of loading
    budget = max(1, int(args.weight_budget_mib * 2**20)) if args.weight_budget_mib else None
    parts = {"quantize_lm_head": args.quantize_lm_head}
    if args.parts is not None:
        parts = {f"quantize_{p}": p in args.parts or (p == "lm_head" and args.quantize_lm_head) for p in PARTS}
    try:
        config = QuantConfig(group_size=args.group_size, method=args.method, gptq_damp=args.gptq_damp,
                             act=args.act, include=tuple(args.include),
                             exclude=tuple(args.exclude), **parts, keep_most_sensitive=args.keep_most_sensitive,
                             weight_budget_bytes=budget, sensitivity=args.sensitivity,
                             sensitivity_batches=args.sensitivity_batches, input_scales=args.input_scales)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from e
    if config.mixed_precision and not (args.calibration or args.calibration_images):
        raise CLIError("--keep-most-sensitive / --weight-budget-mib rank layers by their output error on calibration "
                       "inputs: give --calibration prompts.txt and/or --calibration-images")
    if config.input_scales and not (args.calibration or args.calibration_images):
        raise CLIError("--input-scales searches each layer's scale on its calibration inputs: give --calibration "
                       "prompts.txt and/or --calibration-images")
    lines = _read_lines(args.calibration)[: args.calib_samples] if args.calibration else None
    if lines == []:
        raise CLIError(f"--calibration {args.calibration}: the file has no non-empty line")
    name = args.model
    configs = _checkpoint_dir(name, "MODEL", weights=False)  # after the option checks, before any weights
    fmt = _foreign_format(configs)
    if fmt is not None:  # transformers would need autoawq / gptqmodel to load it, and its weights are int4 already
        raise CLIError(f"{name!r} is already an int4 checkpoint ({fmt.name}): `minicpm-int4 convert {name} "
                       f"{args.out}` reads it exactly (quantize takes an fp16 / bf16 model)")
    bnb = _bitsandbytes_checkpoint(configs)
    if bnb:
        raise CLIError(f"{name!r} is a bitsandbytes {bnb} checkpoint: its weights are not this package's integer "
                       "grid, and quantizing them again would round twice; quantize the fp16 / bf16 model it was made "
                       "from (MiniCPM-V's official -int4 checkpoints are bitsandbytes nf4 copies of the fp16 release)")
    args.model = name if configs == name else _checkpoint_dir(name, "MODEL")  # (a Hub model: now its weights)
    images, processor = _images_and_processor(args, args.calibration_images, "--calibration-images", args.calib_samples)
    tok = (processor.tokenizer if processor is not None else _load_tokenizer(args)) if lines else None
    model = _load_model(args, dtype, device)
    calib = None
    if lines or images:
        batches = _prompt_batches(tok, lines, processor, images, device, dtype, args.max_length, "--calibration-images")
        if images:
            print(f"calibration: {len(lines or [])} text prompt(s), {len(images)} image prompt(s)", file=sys.stderr)
        calib = calibrate(model, batches)
    report = patch_model(model, config, calibration=calib)
    print(report)
    save_quantized(model, args.out, report)  # also writes config.json for load_pretrained_quantized
    print(f"saved to {args.out}; {_peak_memory(device)} while quantizing")
    _carry_support_files(args.model, args.out)
    from .hf_integration import register

    remote = ", trust_remote_code=True" if args.trust_remote_code else ""
    print(f"load it with minicpm_int4.checkpoint.load_pretrained_quantized({args.out!r}{remote})"
          + ("" if register() else f", or after `import minicpm_int4` with {args.model_class}"
                                   f".from_pretrained({args.out!r}{remote})"))
    if args.verify_load:
        del model
        import gc

        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        load_pretrained_quantized(args.out, device=device, trust_remote_code=args.trust_remote_code)
        print(f"reloaded module by module: {_peak_memory(device)}")
    return 0


def _bitsandbytes_checkpoint(path: str) -> str | None:
    """The scheme ("nf4", "fp4", "int8") where folder `path`'s config.json says bitsandbytes quantized it, else None."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            qc = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(qc, dict) or str(qc.get("quant_method", "")).lower() != "bitsandbytes":
        return None
    if qc.get("load_in_8bit"):
        return "int8"
    return str(qc.get("bnb_4bit_quant_type") or "4-bit")


def _foreign_format(path: str):
    """foreign.detect(path) with its refusal (an AWQ / GPTQ / compressed-tensors variant it cannot read exactly)
    as a CLIError."""
    from .foreign import ForeignFormatError, detect

    try:
        return detect(path)
    except ForeignFormatError as e:
        raise CLIError(str(e)) from e


def cmd_convert(args) -> int:
    from . import QuantLinear, save_quantized
    from .checkpoint import CheckpointMismatchError, load_pretrained_quantized

    name = args.model
    configs = _checkpoint_dir(name, "MODEL", weights=False)
    fmt = _foreign_format(configs)
    if fmt is None:
        raise CLIError(f"{name!r} is not an AWQ, GPTQ or compressed-tensors int4 checkpoint: its config.json has no "
                       "quantization_config with quant_method 'awq' / 'gptq' / 'compressed-tensors', and there is no "
                       "quantize_config.json (an fp16 / bf16 model is quantized with `minicpm-int4 quantize`)")
    device = _device(args.device)
    args.model = name if configs == name else _checkpoint_dir(name, "MODEL")
    print(f"reading the {fmt.name} checkpoint {name} on {device}", file=sys.stderr)
    try:
        model = load_pretrained_quantized(args.model, device=device, trust_remote_code=args.trust_remote_code,
                                          dtype=_dtype(args.dtype) if args.dtype else None)
    except (OSError, ValueError, ImportError, CheckpointMismatchError) as e:
        raise CLIError(f"cannot read {name!r}: {e}") from e
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    save_quantized(model, args.out)
    _carry_support_files(args.model, args.out)
    sizes = sorted({m.group_size for m in layers})
    print(f"{len(layers)} int4 layers (group size {', '.join('per channel' if g == -1 else str(g) for g in sizes)}) read "
          f"exactly from {fmt.name}; saved to {args.out}")
    remote = ", trust_remote_code=True" if args.trust_remote_code else ""
    print(f"load it with minicpm_int4.checkpoint.load_pretrained_quantized({args.out!r}{remote}) (the {fmt.name} folder "
          "itself loads that way too)")
    return 0


def cmd_eval(args) -> int:
    import json as _json

    from .checkpoint import CheckpointMismatchError, load_pretrained_quantized, read_quant_config
    from .evaluate import compare_models, layer_table, perplexity

    if not args.prompts and not args.text and not args.images:
        raise CLIError("give --prompts, --images and/or --text")
    out = {"model": args.model, "quantized": args.quantized}  # as given (a Hub model's name, not its cache folder)
    args.quantized = _checkpoint_dir(args.quantized, "QUANTIZED")
    if _foreign_format(args.quantized) is None:  # an AWQ / GPTQ / compressed-tensors folder is read as it is
        try:
            read_quant_config(args.quantized)
        except (FileNotFoundError, CheckpointMismatchError) as e:
            raise CLIError(str(e)) from e
    device = _device(args.device)
    dtype = _dtype(args.dtype)
    lines = _read_lines(args.prompts) if args.prompts else []
    if args.prompts and not lines:
        raise CLIError(f"--prompts {args.prompts}: the file has no non-empty line")
    args.model = _checkpoint_dir(args.model, "MODEL")
    images, processor = _images_and_processor(args, args.images, "--images")
    tok = processor.tokenizer if processor is not None else _load_tokenizer(args)
    ref = _load_model(args, dtype, device)
    try:
        quant = load_pretrained_quantized(args.quantized, device=device, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, ImportError, CheckpointMismatchError) as e:
        raise CLIError(f"cannot load the quantized model from {out['quantized']!r}: {e}") from e
    if lines or images:  # the images' prompts: the lines in turn, as in quantize
        batches = _prompt_batches(tok, lines, processor, images, device, dtype, args.max_length, "--images")
        res = compare_models(ref, quant, batches)
        res["prompts"], res["image_prompts"] = len(lines), len(images or [])
        out.update(res)
        print(f"{res['tokens']} tokens ({len(lines)} text prompt(s), {len(images or [])} image prompt(s)): "
              f"next-token KL divergence {res['kl_divergence']:.5f}, "
              f"top-1 agreement {100 * res['top1_agreement']:.1f}%")
        print(layer_table(res))
    if args.text:
        with open(args.text) as f:
            ids = tok(f.read(), return_tensors="pt")["input_ids"].to(device)
        out["perplexity"] = {"reference": perplexity(ref, ids, args.max_length), "quantized": perplexity(quant, ids, args.max_length),
                             "tokens": int(ids.shape[1])}
        print(f"perplexity on {ids.shape[1]} tokens: reference {out['perplexity']['reference']:.3f}, "
              f"int4 {out['perplexity']['quantized']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            _json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _dtype(name):
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def cmd_bench(args) -> int:
    from .bench.micro import run_microbench
    from .bench.report import write_all, write_checkpoint
    from .bench.shapes import all_shapes

    device = torch.device(_device(args.device))
    if device.type != "cuda" and not args.allow_cpu:
        print("minicpm-int4 bench: no CUDA device; kernel timings on CPU mean nothing (pass --allow-cpu to "
              "exercise the harness anyway)", file=sys.stderr)
        return 2
    shapes = all_shapes(args.models)
    if args.max_n:
        shapes = [s for s in shapes if s.n <= args.max_n]
    backends = None
    if args.backends:
        from .bench.backends import select_backends

        backends = select_backends(args.backends)
        print(f"[bench] backends: {', '.join(b.name for b in backends)}")
    print(f"[bench] {len(shapes)} shapes x M={args.ms} on {device}")
    result = run_microbench(shapes, args.ms, device=device, dtype=_dtype(args.dtype), group_size=args.group_size,
                            rep_ms=args.rep_ms, time_budget_s=args.time_budget_s, backends=backends,
                            checkpoint=lambda res: write_checkpoint(res, args.out, "bench"))
    files = write_all(result, args.out, "bench")
    print("\n".join(f"wrote {f}" for f in files))
    ours_failed = [e for e in result.get("errors", []) if e["family"] == "ours"]
    for e in ours_failed:
        print(f"FAILED: {e['backend']} on {e['n']} x {e['k']}: {e['error']}", file=sys.stderr)
    return 1 if ours_failed else 0


def cmd_profile(args) -> int:
    from .bench.e2e import run_profile
    from .bench.report import profile_markdown, write_all, write_checkpoint

    device = torch.device(_device(args.device))
    if device.type != "cuda" and not args.allow_cpu:
        print("minicpm-int4 profile: no CUDA device (pass --allow-cpu to exercise the harness on CPU)", file=sys.stderr)
        return 2
    result = run_profile(args.models, size=args.size, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                         image_grid=args.image_grid, modes=args.modes, group_size=args.group_size, device=device,
                         dtype=_dtype(args.dtype), trace_dir=args.out if args.trace else None,
                         time_budget_s=args.time_budget_s,
                         checkpoint=lambda res: write_checkpoint(res, args.out, "profile"), w4a8=args.w4a8,
                         fuse=not args.no_fuse)
    files = write_all(result, args.out, "profile")
    print(profile_markdown(result))
    print("\n".join(f"wrote {f}" for f in files))
    return 0


def _csv_ints(s):
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers") from None
    bad = [v for v in vals if v < 1]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"{s!r}: token counts must be positive integers")
    return vals


def _csv(s):
    return [v.strip() for v in s.split(",") if v.strip()]


def _csv_of(choices, what: str = ""):
    """argparse type: a comma-separated list drawn from `choices`, refused naming the unknown ones."""
    def parse(s):
        vals = _csv(s)
        unknown = [v for v in vals if v not in choices]
        if unknown or not vals:
            raise argparse.ArgumentTypeError(f"unknown {what + ' ' if what else ''}{unknown or s!r}: "
                                             f"choose from {','.join(choices)}")
        return vals
    return parse


def _act_spec(s: str):
    """argparse type of --act: int8 (every part), none, or part=int8[,part=int8...] (the parts not named
    keep fp16 / bf16 activations), as QuantConfig.act takes them."""
    from .config import ACTS

    names = {"none": None, "int8": "int8"}
    if "=" not in s:
        if s not in names:
            raise argparse.ArgumentTypeError(f"{s!r}: give int8, none, or part=int8[,part=int8...]")
        return names[s]
    spec = {}
    for item in _csv(s):
        part, _, act = item.partition("=")
        if part not in PARTS:
            raise argparse.ArgumentTypeError(f"unknown model part {part!r} in {s!r}: choose from {','.join(PARTS)}")
        if act not in names or names[act] not in ACTS:
            raise argparse.ArgumentTypeError(f"{item!r}: the activations of a part are int8 or none")
        spec[part] = names[act]
    return spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minicpm-int4", description="int4 inference kernels for MiniCPM-V")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="patch a small random-weight MiniCPM-V and compare it with the original")
    d.add_argument("--model", choices=list(DEMO_MODELS), default=None,
                   help="default 4.6; with a transformers that has no native 4.6 class (4.x), the 2.6 layout")
    d.add_argument("--size", choices=["tiny", "demo"], default="demo")
    d.add_argument("--dtype", choices=["fp16", "bf16"], default=None)
    d.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    d.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128, -1])
    d.add_argument("--method", choices=["rtn", "search"], default="search")
    d.add_argument("--new-tokens", type=_positive_int, default=16)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", default=None, help="also write the figures to this JSON file")
    d.set_defaults(func=cmd_demo)
    q = sub.add_parser("quantize", help="quantize a pretrained model and save it")
    q.add_argument("model", help="local path or hub name")
    q.add_argument("out", type=_output_dir, help="output directory")
    q.add_argument("--model-class", default=None,
                   help="default: AutoModel for remote code (a config loaded through the checkpoint's own code: MiniCPM-V 2.x / "
                        "o-2.6 with --trust-remote-code), else AutoModelForImageTextToText")
    q.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="bf16")
    q.add_argument("--device", default=None)
    q.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, -1])
    q.add_argument("--method", choices=list(METHODS), default="search",
                   help="gptq needs --calibration and/or --calibration-images (error feedback along each layer's input Hessian)")
    q.add_argument("--gptq-damp", type=_positive_float, default=0.1,
                   help="gptq's dampening (H + d * mean(diag H) * I), in (0, 1]; 0.1 measured best on trained weights")
    q.add_argument("--calibration", default=None, type=_existing_file, help="text file, one calibration prompt per line (activation-aware search, gptq, sensitivity)")
    q.add_argument("--calibration-images", nargs="+", default=None, metavar="IMAGE_OR_FOLDER",
                   help="images (files or folders) that calibrate the vision tower as well: each one with a calibration "
                        "line (in turn) as its prompt, through the model's processor and chat template (native 4.x)")
    q.add_argument("--calib-samples", type=_positive_int, default=64,
                   help="calibration lines used (the first N), and images (the first N)")
    q.add_argument("--max-length", type=_positive_int, default=512,
                   help="tokens per calibration line (image prompts are kept whole)")
    q.add_argument("--keep-most-sensitive", type=_nonnegative_int, default=0, help="mixed precision: keep the k most sensitive layers")
    q.add_argument("--weight-budget-mib", type=_positive_float, default=None, help="mixed precision: Linear weight budget")
    q.add_argument("--sensitivity", choices=list(SENSITIVITIES), default="model",
                   help="mixed precision ranks layers by the model's output error with each alone back in high precision "
                        "(model: one forward over --sensitivity-batches calibration prompts per layer; measured better) "
                        "or by each layer's own output error (layer: no extra forward)")
    q.add_argument("--sensitivity-batches", type=_positive_int, default=4,
                   help="calibration prompts (N of them, evenly spaced: text and image ones) that --sensitivity model runs per layer")
    q.add_argument("--input-scales", action="store_true",
                   help="per-channel AWQ scales also where none folds into the previous op (post-norm layers, attention "
                        "output, an MLP's second layer): the layer multiplies its input by it at runtime (inside the "
                        "decode kernels' and the int8 quantizers' loads of x, else one elementwise pass); needs "
                        "--calibration and/or --calibration-images")
    q.add_argument("--act", type=_act_spec, default=None,
                   help="activations: int8 (W4A8 everywhere), none (W4A16, the default), or per part, e.g. "
                        "vision=int8 (prefill-heavy parts on int8 tensor cores; decode rows use the W4A16 kernel); "
                        "with --input-scales the int8 activations cost less accuracy (on MiniLM with the search: "
                        "1-3%% more error than W4A16 instead of 9-10%%)")
    q.add_argument("--include", nargs="+", default=(), metavar="PATTERN",
                   help="fnmatch patterns of module names forced into int4 (where they can be)")
    q.add_argument("--exclude", nargs="+", default=(), metavar="PATTERN",
                   help="fnmatch patterns of module names kept in high precision (exclude wins over include)")
    q.add_argument("--quantize-lm-head", action="store_true")
    q.add_argument("--parts", default=None, type=_csv_of(PARTS, "model part(s)"),
                   help=f"comma-separated model parts to quantize, of {','.join(PARTS)} (default: QuantConfig's, "
                        "llm,vision,other; o-2.6's audio encoder and TTS are 'audio' and 'tts')")
    q.add_argument("--verify-load", action="store_true", help="reload the result module by module and report peak memory")
    q.add_argument("--trust-remote-code", action="store_true")
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser("eval", help="compare a quantized model with its original: KL, top-1, perplexity, per-layer error")
    e.add_argument("model", help="the original model (path or hub name)")
    e.add_argument("quantized", help="directory written by `minicpm-int4 quantize` (or `convert`), or an AWQ / GPTQ / "
                                     "compressed-tensors int4 checkpoint's folder; or such a model's Hub id")
    e.add_argument("--prompts", default=None, type=_existing_file, help="text file, one prompt per line")
    e.add_argument("--images", nargs="+", default=None, metavar="IMAGE_OR_FOLDER",
                   help="images (files or folders) compared as well, each with a --prompts line in turn as its prompt, "
                        "through the model's processor and chat template (native 4.x): the vision tower's layers get "
                        "their errors too")
    e.add_argument("--text", default=None, type=_existing_file, help="text file for perplexity")
    e.add_argument("--model-class", default=None,
                   help="default: AutoModel for remote code (a config loaded through the checkpoint's own code: MiniCPM-V 2.x / "
                        "o-2.6 with --trust-remote-code), else AutoModelForImageTextToText")
    e.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="bf16")
    e.add_argument("--device", default=None)
    e.add_argument("--max-length", type=_positive_int, default=512,
                   help="tokens per prompt, and the perplexity window")
    e.add_argument("--json", default=None)
    e.add_argument("--trust-remote-code", action="store_true")
    e.set_defaults(func=cmd_eval)
    c = sub.add_parser("convert", help="read an AWQ (GEMM), GPTQ or compressed-tensors int4 checkpoint exactly and save "
                                       "it in this package's format")
    c.add_argument("model", help="the int4 checkpoint: a local folder (config.json with its quantization_config) or a "
                                 "Hugging Face Hub model id, fetched")
    c.add_argument("out", type=_output_dir, help="output directory")
    c.add_argument("--device", default=None, help="where the model is built while converting (default: cuda when available)")
    c.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="the model's dtype (default: its config.json's); AWQ's scales are fp16, exact in fp16 / fp32 only")
    c.add_argument("--trust-remote-code", action="store_true",
                   help="run the modeling code beside the checkpoint (MiniCPM-V 2.x / o-2.6)")
    c.set_defaults(func=cmd_convert)
    from .bench.shapes import M_SWEEP, MODEL_SHAPES
    b = sub.add_parser("bench", help="kernel microbenchmarks against fp16 torch.matmul and peers")
    b.add_argument("--models", type=_csv_of(list(MODEL_SHAPES)), default=list(MODEL_SHAPES),
                   help=f"comma list of {list(MODEL_SHAPES)}")
    b.add_argument("--ms", type=_csv_ints, default=list(M_SWEEP), help="comma list of M (tokens)")
    b.add_argument("--max-n", type=_positive_int, default=None, help="skip shapes with more outputs (e.g. lm_head)")
    from .bench.backends import default_backends

    bench_backends = [x.name for x in default_backends()]
    b.add_argument("--backends", type=_csv_of(bench_backends, "backend"), default=None,
                   help=f"comma list of the backends to time (default: all; fp16 is always timed, every speedup "
                        f"is against it): {','.join(bench_backends)}")
    b.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, -1])
    b.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    b.add_argument("--rep-ms", type=float, default=100.0,
                   help="time per case spent replaying its CUDA graph of calls (ms; on CPU, of calls)")
    b.add_argument("--out", default="bench-results", help="output folder (JSON, Markdown, PNG)")
    b.add_argument("--time-budget-s", type=float, default=None, help="stop after this long and write what is done")
    b.add_argument("--device", default=None)
    b.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    b.set_defaults(func=cmd_bench)
    pr = sub.add_parser("profile", help="end-to-end latency vs fp16 on full-size random-weight models")
    from .bench.e2e import MODELS as E2E_MODELS, MODES
    pr.add_argument("--models", type=_csv_of(E2E_MODELS), default=["minicpmv4.6", "llama3-v2.5"],
                    help=f"comma list of {','.join(E2E_MODELS)}")
    pr.add_argument("--size", choices=["full", "tiny"], default="full")
    pr.add_argument("--prompt-tokens", type=_positive_int, default=512)
    pr.add_argument("--new-tokens", type=_positive_int, default=128)
    pr.add_argument("--image-grid", type=_positive_int, default=28, help="image size in patches per side (28 = 448 px)")
    pr.add_argument("--modes", type=_csv_of(MODES), default=list(MODES),
                    help="eager, cudagraph (the decode step captured by hand in one CUDA graph) and/or graphed "
                         "(transformers' decode-step compile, mode='reduce-overhead'); run in that order")
    pr.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, -1])
    pr.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    pr.add_argument("--trace", action="store_true", help="also write a Chrome trace and print the top kernels")
    pr.add_argument("--w4a8", action="store_true",
                    help="also an eager run of the int4 model with int8 activations (W4A8: vision and prefill; "
                         "decode stays W4A16), weights 'int4-w4a8'")
    pr.add_argument("--no-fuse", action="store_true",
                    help="leave out the 'int4-fused' runs (every mode: the int4 model after fuse_projections, "
                         "q / k / v and gate / up one GEMM each at decode)")
    pr.add_argument("--out", default="profile-results")
    pr.add_argument("--time-budget-s", type=float, default=None, help="skip the runs left after this long")
    pr.add_argument("--device", default=None)
    pr.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    pr.set_defaults(func=cmd_profile)
    ik = sub.add_parser("inspect-kernels", add_help=False,
                        help="compile the Triton kernels for sm_80 / sm_90a without a GPU: registers, spills, "
                             "load widths, tensor cores, SASS instructions per weight (--help for options)")
    sub.add_parser("inspect-cuda", add_help=False,
                   help="compile the CUDA extension's kernels (csrc/) with nvcc for sm_80 / sm_90a: registers, "
                        "spills, SASS instructions per weight (--help for options)")
    sub.add_parser("env", add_help=False,
                   help="versions, devices, which backends this install can run (and why not), what "
                        "backend='auto' picks; for bug reports (--help for options)")
    sub.add_parser("dispatch-table", add_help=False,
                   help="a dispatch table for backend='auto' from a bench run's bench.json (a GPU the package has "
                        "not measured: --out PATH, then MINICPM_INT4_DISPATCH_TABLE=PATH) (--help for options)")
    sub.add_parser("targets", add_help=False,
                   help="the issues' performance targets checked against a results folder's bench.json / "
                        "profile.json; writes targets.md there (--help for options)")
    sub.add_parser("counters", add_help=False,
                   help="Nsight Compute's hardware counters of the decode / prefill kernels beside fp16's: DRAM / "
                        "L2 / SM %% of peak, occupancy, issue slots, warp stalls (a GPU and ncu; --help for options)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["inspect-kernels"]:  # its own parser (kernels/aot.py) takes the rest
        from .kernels import aot

        return aot.main(argv[1:])
    if argv[:1] == ["inspect-cuda"]:  # its own parser (kernels/csrc_inspect.py)
        from .kernels import csrc_inspect

        return csrc_inspect.main(argv[1:])
    if argv[:1] == ["env"]:  # its own parser (diagnose.py)
        from . import diagnose

        return diagnose.main(argv[1:])
    if argv[:1] == ["dispatch-table"]:  # its own parser (bench/dispatch_table.py)
        from .bench import dispatch_table

        return dispatch_table.main(argv[1:])
    if argv[:1] == ["targets"]:  # its own parser (bench/targets.py)
        from .bench import targets

        return targets.main(argv[1:])
    if argv[:1] == ["counters"]:  # its own parser (bench/counters.py)
        from .bench import counters

        return counters.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "demo" and args.dtype is None:
        args.dtype = "fp16" if torch.cuda.is_available() else "bf16"
    try:
        return args.func(args)
    except CLIError as e:
        if os.environ.get("MINICPM_INT4_TRACEBACK") == "1":
            raise
        print(f"minicpm-int4 {args.command}: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2


if __name__ == "__main__":
    sys.exit(main())
