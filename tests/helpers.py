"""Shared test helpers: random quantized layers and derived tolerances."""
import types

import torch

from minicpm_int4.packing import pack_int4, unpack_int4
from minicpm_int4.quantize import quantize_rtn
from minicpm_int4.reference import dequantize_ref, gemm_tolerance, w4a8_tolerance  # noqa: F401

EPS32 = torch.finfo(torch.float32).eps


def random_qweight(n, k, group_size, dtype, seed=0, device="cpu"):
    """A random fp weight quantized with rtn: (qweight, scales, zeros, effective group size), on
    `device` (drawn on the CPU's generator either way; quantized and packed on `device`: the gpu
    tests' real shapes would spend seconds each doing it on the host)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(device=device, dtype=dtype)
    qw = quantize_rtn(w, group_size)
    gs = k if group_size == -1 else group_size
    return pack_int4(qw.q), qw.scales, qw.zeros, gs


def random_input_scale(k, dtype=torch.float32, seed=0):
    """A layer's per-channel input scale for tests: exp(N(0, 1)), positive and spread over ~e^-3..e^3,
    so that products with it round."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(k, generator=g)).to(dtype)


def assert_gemm_close(y, y_ref, x, w):
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert torch.isfinite(y).all(), "output has NaN/inf (an element never written?)"
    tol = gemm_tolerance(x, w, y.dtype, y_ref)
    err = (y.double() - y_ref.double()).abs().float()
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} elements off; worst excess {(err - tol).max().item():.3g}"


def assert_close_to_unfused_bias(y, y_theirs, x, w, bias):
    """|y - y_theirs| within gemm_tolerance, plus half an ulp of the other package's product before its bias:
    AutoAWQ's and AutoGPTQ's torch forwards round x @ W to the output dtype and then add the bias in it (one
    more rounding than the single one gemm_tolerance allows each side)."""
    assert y.shape == y_theirs.shape and y.dtype == y_theirs.dtype
    tol = gemm_tolerance(x, w, y.dtype, y_theirs).double()
    if bias is not None:
        tol += torch.finfo(y.dtype).eps / 2 * (y_theirs.double() - bias.double()).abs()
    err = (y.double() - y_theirs.double()).abs()
    assert torch.isfinite(y).all() and not (err > tol).any(), f"worst excess {(err - tol).max().item():.3g}"


def load_submodules(package: str, modules, bypass=()):
    """Import `modules` of an installed `package` without running the package's __init__, nor those of its
    subpackages in `bypass` (AutoAWQ's and AutoGPTQ's import their whole quantizers: datasets, model zoos);
    yields a namespace of them (by last name) and then restores sys.modules. None where the package is not
    installed."""
    import importlib
    import importlib.util
    import os
    import sys
    import types
    import warnings

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        yield None
        return
    mine = lambda k: k == package or k.startswith(package + ".")  # noqa: E731
    saved = {k: v for k, v in sys.modules.items() if mine(k)}
    for sub in (package, *(f"{package}.{b}" for b in bypass)):
        if sub not in sys.modules:
            path = [os.path.join(p, *sub.split(".")[1:]) for p in spec.submodule_search_locations]
            pkg = types.ModuleType(sub)
            pkg.__path__, pkg.__file__ = path, os.path.join(path[0], "__init__.py")
            pkg.__spec__ = importlib.util.spec_from_file_location(sub, pkg.__file__, submodule_search_locations=path)
            sys.modules[sub] = pkg
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield types.SimpleNamespace(**{m.rsplit(".", 1)[-1]: importlib.import_module(f"{package}.{m}")
                                           for m in modules})
    finally:
        for k in [k for k in sys.modules if mine(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def record_layer_io(model, layers, *inputs):
    """Run model(*inputs) once without grad; {name: (input, output)} of each module in `layers` ({name:
    module}) on that call (forward hooks, removed after)."""
    seen = {}

    def record(name):
        def hook(module, args, y):
            seen[name] = (args[0].detach(), y.detach())
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(seen) == sorted(layers), "a layer was not reached"
    return seen


def dequant(qweight, scales, zeros, gs, dtype):
    return dequantize_ref(qweight, scales, zeros, gs, out_dtype=dtype)


def static_cache_reads_linear_weights() -> bool:
    """transformers 4.38 - 4.41 set up a static KV cache in `_setup_cache`, taking its dtype from
    `o_proj.weight` (later versions ask the model's dtype)."""
    from transformers import LlamaForCausalLM

    return hasattr(LlamaForCausalLM, "_setup_cache")


def static_cache_fails_unpatched(kind: str = "4_6"):
    """Why this transformers cannot decode the tiny fp32 native model (`kind`) with a static cache, untouched
    by this package, or None where it can: 5.10's generate builds no causal mask for the linear-attention
    layers of the Qwen3.5-style text model (KeyError 'linear_attention'); 5.25 does."""
    from minicpm_int4.tiny import NativeModelUnavailable, build_native

    with torch.random.fork_rng():  # (build_native seeds torch's generator: the caller's draws stay its own)
        try:
            model = build_native(kind)
        except NativeModelUnavailable:
            return None  # (a transformers without the class: what the caller does then is its own)
        ids = torch.randint(10, 100, (1, 6), generator=torch.Generator().manual_seed(0))
        try:
            model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static")
        except Exception as e:  # (any of transformers' own: this model is not patched)
            return f"{type(e).__name__}: {e}"
    return None


def save_word_tokenizer(path, n_words: int = 200) -> None:
    """A real tokenizer directory (from_pretrained-loadable): whitespace words w0 .. w{n-1}, ids from 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(n_words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)


def write_word_prompts(path, lines: int = 6, words: int = 12, n_words: int = 200) -> None:
    path.write_text("\n".join(" ".join(f"w{(i * 7 + j * 3) % n_words}" for j in range(words)) for i in range(lines)))


def check_empty_batch(device, backend, ops_backend=None):
    """An empty batch (M = 0: e.g. no image tokens in a step) gives empty outputs of the right
    shapes and dtypes through every op and through QuantLinear; the kernels are not launched (a
    0-sized Triton grid crashed the interpreter)."""
    from torch import nn

    from minicpm_int4 import QuantConfig, QuantLinear, ops

    ops_backend = ops_backend or backend
    qweight, scales, zeros = (t.to(device) for t in random_qweight(40, 128, 64, torch.float16)[:3])
    x = torch.randn(0, 128, dtype=torch.float16, device=device)
    bias = torch.randn(40, dtype=torch.float16, device=device)
    y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, 64, backend=ops_backend)
    assert y.shape == (0, 40) and y.dtype == torch.float16 and y.device == x.device
    ws = ops.w4a16_workspace(40, device)
    assert ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, backend=ops_backend, workspace=ws).shape == (0, 40)
    x_q, s = ops.quantize_per_token_int8(x, backend=ops_backend)
    assert x_q.shape == (0, 128) and x_q.dtype == torch.int8 and s.shape == (0,) and s.dtype == torch.float32
    if ops_backend != "cuda":
        y8 = ops.w4a8_gemm(x_q, s, qweight, scales, zeros, bias.bfloat16(), 64, torch.bfloat16, backend=ops_backend)
        assert y8.shape == (0, 40) and y8.dtype == torch.bfloat16
    lin = nn.Linear(128, 40, dtype=torch.float16, device=device)
    for act in (None, "int8"):
        if act == "int8" and backend == "cuda":
            continue
        ql = QuantLinear.from_linear(lin, QuantConfig(group_size=64, backend=backend, act=act))
        assert ql(torch.randn(2, 0, 128, dtype=torch.float16, device=device)).shape == (2, 0, 40)


def check_quantlinear_backend(lin, group_size, act, lead, backend):
    """QuantLinear(backend=backend) against the reference path of the same layer on random input of
    shape [*lead, K] on lin's device: W4A16 within the GEMM tolerance, W4A8 (M >= W4A8_MIN_M)
    within w4a8_tolerance (its int32 sums exact, the fp32 epilogue's rounding bounded)."""
    from minicpm_int4 import QuantConfig, QuantLinear, ops

    n, k = lin.out_features, lin.in_features
    dtype, device = lin.weight.dtype, lin.weight.device
    ql = QuantLinear.from_linear(lin, QuantConfig(group_size=group_size, backend=backend, act=act))
    ref = QuantLinear.from_linear(lin, QuantConfig(group_size=group_size, backend="torch", act=act))
    x = torch.randn(*lead, k, dtype=dtype, device=device)
    y, y_ref = ql(x), ref(x)
    assert y.shape == (*lead, n) and y.dtype == dtype and y.device == x.device
    if x.numel() == 0:
        return
    x2, y, y_ref = x.reshape(-1, k), y.reshape(-1, n), y_ref.reshape(-1, n)
    if act == "int8" and x2.shape[0] >= ops.W4A8_MIN_M:
        x_q, s = ops.quantize_per_token_int8(x2, backend="torch")
        tol = w4a8_tolerance(x_q, s, ql.qweight, ql.scales, ql.zeros, ql._kernel_group_size, dtype, y_ref)
        assert ((y.double() - y_ref.double()).abs() <= tol.double()).all(), (y - y_ref).abs().max()
    else:
        assert_gemm_close(y, y_ref, x2, ql.dequantized_weight())


MM_TOKENS = {"image_start_token": "<image>", "image_end_token": "</image>", "slice_start_token": "<slice>",
             "slice_end_token": "</slice>", "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>",
             "video_token": "<video>"}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<img_pad>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_minicpmv4_6_processor(image_token_id: int, n_words: int = 200, scale_resolution: int = 56):
    """The real MiniCPMV4_6Processor (image slicing, placeholders, chat template) over the PIL image
    processor and a word tokenizer whose image token has the tiny model's id, sized for the tiny
    vision tower (14-pixel patches, 4 x 4 per slice). The class is subclassed only to leave out its
    video processor, which needs torchvision (CI's CPU torch has no torchvision wheel to match it); the
    image path is the class's own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MiniCPMV4_6Processor, PreTrainedTokenizerFast
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    specials = ["[UNK]", "[PAD]", "<|im_start|>", "<|im_end|>", *MM_TOKENS.values()]
    vocab = specials[:image_token_id] + ["<img_pad>"] + specials[image_token_id:] + [f"w{i}" for i in range(n_words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials + ["<img_pad>"])  # whole, not split at their punctuation
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        extra_special_tokens={"image_token": "<img_pad>", **MM_TOKENS})
    assert tokenizer.image_token_id == image_token_id

    class ImageOnlyProcessor(MiniCPMV4_6Processor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            ip = self.image_processor
            self.slice_mode, self.video_slice_mode, self.default_use_image_id = ip.slice_mode, False, ip.use_image_id
            self.image_token_divisor = self.video_token_divisor = 4 if ip.downsample_mode == "4x" else 16
            for name in ("image_token", "image_token_id", "video_token", "video_token_id", *MM_TOKENS):
                setattr(self, name, getattr(tokenizer, name))
            if not hasattr(self, "video_processor"):  # transformers 5.7 - 5.10's __call__ reads its downsample_mode
                self.video_processor = types.SimpleNamespace(downsample_mode=ip.downsample_mode)  # without videos too

    image_processor = MiniCPMV4_6ImageProcessorPil(scale_resolution=scale_resolution, patch_size=14, max_slice_nums=4)
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def write_random_images(folder, sizes=((80, 120), (60, 60), (130, 70)), seed: int = 0) -> list:
    """PNG files of random pixels (not blank: every channel of the vision tower sees real variation)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths
