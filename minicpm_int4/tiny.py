"""Small random-weight MiniCPM-V models built from the real transformers classes (no download).

Used by the demo, the tests and the benchmarks. Model classes are imported lazily so that the
package imports with any transformers >= 4.40 (the native 4.6 / 4.7 / OCR classes need 5.x).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# (hidden, intermediate, layers, heads, kv heads, head_dim, vocab, vision hidden, vision layers)
SIZES = {
    "tiny": (64, 128, 4, 4, 2, 16, 256, 64, 2),
    "demo": (256, 768, 4, 4, 2, 64, 2048, 128, 2),
}
NATIVE_KINDS = {
    "4_6": ("MiniCPMV4_6Config", "MiniCPMV4_6ForConditionalGeneration"),
    "4_7": ("MiniCPMV4_7Config", "MiniCPMV4_7ForConditionalGeneration"),
    "ocr": ("MiniCPMOcrConfig", "MiniCPMOcrForConditionalGeneration"),
}
IMAGE_TOKEN_ID = 5
PATCH = 14


class NativeModelUnavailable(ImportError):
    """The installed transformers has no native class for this MiniCPM-V generation."""


def _transformers_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise NativeModelUnavailable(f"transformers {transformers.__version__} has no {name}; the native MiniCPM-V "
                                     "classes need transformers >= 5 (4.7 and OCR need a recent 5.x)")
    return cls


def native_config(kind: str = "4_6", size: str = "tiny"):
    h, inter, layers, heads, kv, hd, vocab, vh, vl = SIZES[size]
    text = dict(model_type="qwen3_5_text", hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, vocab_size=vocab,
                linear_key_head_dim=hd, linear_value_head_dim=hd, linear_num_key_heads=max(1, heads // 2),
                linear_num_value_heads=heads)
    vision = dict(hidden_size=vh, intermediate_size=2 * vh, num_hidden_layers=vl, num_attention_heads=2,
                  image_size=4 * PATCH, patch_size=PATCH)
    extra = {"image_token_id": IMAGE_TOKEN_ID} if kind != "4_7" else {}
    return _transformers_class(NATIVE_KINDS[kind][0])(text_config=text, vision_config=vision, insert_layer_id=0, **extra)


def build_native(kind: str = "4_6", size: str = "tiny", dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
    """A random-weight native MiniCPM-V model (`kind` in 4_6, 4_7, ocr) in eval mode."""
    torch.manual_seed(seed)
    cfg = native_config(kind, size)
    model = _transformers_class(NATIVE_KINDS[kind][1])(cfg)
    return model.to(device=device, dtype=dtype).eval()


def image_inputs(model, batch_images: int = 1, grid: int = 4, seed: int = 1, device=None, dtype=None):
    """NaViT-packed pixel values for one `grid` x `grid`-patch image, its target size, and how many
    image placeholder tokens the model turns it into."""
    g = torch.Generator().manual_seed(seed)
    p = model.config.vision_config.patch_size
    pv = torch.randn(1, 3, p, grid * grid * p, generator=g)
    ts = torch.tensor([[grid, grid]], dtype=torch.int32)
    device = device or next(model.parameters()).device
    dtype = dtype or next(model.parameters()).dtype
    pv, ts = pv.to(device=device, dtype=dtype), ts.to(device)
    with torch.no_grad():
        feats = model.model.get_image_features(pv, ts).pooler_output
    n_tokens = sum(f.shape[0] for f in feats)
    return pv, ts, n_tokens


def prompt_with_image(model, text_len: int = 8, seed: int = 2, grid: int = 4):
    """input_ids with the image placeholders between two runs of text, plus the image inputs."""
    pv, ts, n = image_inputs(model, grid=grid, seed=seed)
    vocab = model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(IMAGE_TOKEN_ID + 1, vocab, (text_len,), generator=g)
    ids = torch.cat([text[: text_len // 2], torch.full((n,), IMAGE_TOKEN_ID), text[text_len // 2:]]).unsqueeze(0)
    return ids.to(pv.device), pv, ts


# ---------------------------------------------------------------------------------------------
# Remote-code layout (MiniCPM-V 2.0 / Llama3-V 2.5 / 2.6 / o-2.6): llm + vpm + resampler
# ---------------------------------------------------------------------------------------------
class Resampler(nn.Module):
    """The MiniCPM-V 2.x resampler's structure: learned queries cross-attend (torch
    nn.MultiheadAttention) to projected vision features."""

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, embed_dim) * 0.02)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter((embed_dim ** -0.5) * torch.randn(embed_dim, embed_dim))

    def forward(self, x):  # x [B, L, kv_dim]
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)          # [L, B, D]
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[1], -1)
        out = self.attn(q, x, x)[0].permute(1, 0, 2)              # [B, Q, D]
        return self.ln_post(out) @ self.proj


class MultiModalProjector(nn.Module):
    """MiniCPM-o 2.6's two-layer projector (audio features -> LLM, LLM hidden -> TTS)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.linear2(self.relu(self.linear1(x)))


class ChatTTSHeads(nn.Module):
    """The structure of MiniCPM-o 2.6's `tts` (ConditionalChatTTS): a projector from the LLM, a Llama
    backbone, and weight-normed output heads - `head_code` as o-2.6 builds them (parametrized weight
    norm, computed on access), `head_text` as the original ChatTTS did (the hook-based
    `torch.nn.utils.weight_norm`, whose `.weight` attribute is only refreshed by a forward)."""

    def __init__(self, llm_dim: int, hidden: int, num_audio_tokens: int, num_text_tokens: int, num_vq: int = 2):
        import warnings

        import transformers as tf
        from torch.nn.utils.parametrizations import weight_norm

        super().__init__()
        self.projector = MultiModalProjector(llm_dim, hidden)
        self.model = tf.LlamaModel(tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=8))
        self.head_code = nn.ModuleList(weight_norm(nn.Linear(hidden, num_audio_tokens, bias=False), name="weight")
                                       for _ in range(num_vq))
        # deprecated in torch, still in remote code; under no_grad its first .weight is a leaf tensor, so
        # that the model can be deep-copied (pytorch#103001)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            self.head_text = nn.utils.weight_norm(nn.Linear(hidden, num_text_tokens, bias=False), name="weight")

    def forward(self, llm_hidden):
        """[B, L, llm_dim] -> (text logits [B, L, text tokens], code logits [B, L, num_vq, audio tokens])."""
        h = self.model(inputs_embeds=self.projector(llm_hidden)).last_hidden_state
        return self.head_text(h), torch.stack([head(h) for head in self.head_code], dim=2)


class RemoteLayoutMiniCPMV(nn.Module):
    """A MiniCPM-V 2.x-shaped model: `llm` (LlamaForCausalLM or Qwen2ForCausalLM), `vpm` (SigLIP vision
    transformer), `resampler`. The first `num_queries` positions of the prompt hold the image. With
    `omni` (MiniCPM-o 2.6) it also has `apm` (Whisper encoder), `audio_projection_layer` and `tts`."""

    def __init__(self, llm, vpm, resampler, omni: Optional[dict] = None):
        super().__init__()
        self.llm, self.vpm, self.resampler = llm, vpm, resampler
        for name, module in (omni or {}).items():
            setattr(self, name, module)

    def audio_embed(self, mel):
        """Whisper features of a log-mel spectrogram [B, mel bins, frames], projected to the LLM."""
        return self.audio_projection_layer(self.apm(mel).last_hidden_state)

    def embed(self, input_ids, pixel_values=None):
        emb = self.llm.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            img = self.resampler(self.vpm(pixel_values).last_hidden_state).to(emb.dtype)
            emb = torch.cat([img, emb[:, img.shape[1]:]], dim=1)
        return emb

    def forward(self, input_ids, pixel_values=None):
        return self.llm(inputs_embeds=self.embed(input_ids, pixel_values))

    def generate(self, input_ids, pixel_values=None, **kwargs):
        return self.llm.generate(inputs_embeds=self.embed(input_ids, pixel_values), **kwargs)


def build_remote_layout(llm: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, omni: bool = False,
                        size: str = "tiny"):
    """llm in {"llama" (Llama3-V 2.5), "qwen2" (MiniCPM-V 2.6 / o-2.6)}; SigLIP vision tower; `omni`
    adds o-2.6's audio encoder, audio projection and TTS."""
    import transformers as tf

    torch.manual_seed(seed)
    h, inter, layers, heads, kv, hd, vocab, _, vl = SIZES[size]
    vh = 96  # != LLM hidden, so that the resampler has a kv_proj Linear (as 2.5 / 2.6 do)
    common = dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab)
    if llm == "llama":
        lm = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif llm == "qwen2":
        lm = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    else:
        raise ValueError(f"llm must be 'llama' or 'qwen2', got {llm!r}")
    vcfg = tf.SiglipVisionConfig(hidden_size=vh, intermediate_size=2 * vh, num_hidden_layers=vl,
                                 num_attention_heads=2, image_size=4 * PATCH, patch_size=PATCH)
    vpm = tf.SiglipVisionModel(vcfg)
    vpm = getattr(vpm, "vision_model", vpm)  # transformers 4.x wraps the transformer; 5.x is flat
    extra = None
    if omni:
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        ah = 96
        apm = WhisperEncoder(tf.WhisperConfig(d_model=ah, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=2 * ah,
                                              num_mel_bins=16, max_source_positions=16))
        extra = dict(apm=apm, audio_projection_layer=MultiModalProjector(ah, h),
                     tts=ChatTTSHeads(llm_dim=h, hidden=64, num_audio_tokens=128, num_text_tokens=96))
    model = RemoteLayoutMiniCPMV(lm, vpm, Resampler(num_queries=8, embed_dim=h, num_heads=2, kv_dim=vh), omni=extra)
    return model.to(dtype).eval()


def remote_inputs(model, text_len: int = 12, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    vocab = model.llm.config.vocab_size
    ids = torch.randint(6, vocab, (1, text_len), generator=g)
    size = model.vpm.config.image_size
    pv = torch.randn(1, 3, size, size, generator=g).to(next(model.parameters()).dtype)
    return ids, pv
