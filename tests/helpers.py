"""Shared test helpers: random quantized layers and derived tolerances."""
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


def assert_gemm_close(y, y_ref, x, w):
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert torch.isfinite(y).all(), "output has NaN/inf (an element never written?)"
    tol = gemm_tolerance(x, w, y.dtype, y_ref)
    err = (y.double() - y_ref.double()).abs().float()
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} elements off; worst excess {(err - tol).max().item():.3g}"


def dequant(qweight, scales, zeros, gs, dtype):
    return dequantize_ref(qweight, scales, zeros, gs, out_dtype=dtype)


def static_cache_reads_linear_weights() -> bool:
    """transformers 4.38 - 4.41 set up a static KV cache in `_setup_cache`, taking its dtype from
    `o_proj.weight` (later versions ask the model's dtype)."""
    from transformers import LlamaForCausalLM

    return hasattr(LlamaForCausalLM, "_setup_cache")


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
