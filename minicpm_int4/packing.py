"""How int4 weights sit in memory. The format is defined here, once; everything else refers to it.

Canonical layout (what QuantLinear holds and what checkpoints store):

    q        uint8  [N, K]      quantized weight, values 0..15 (N = out_features, K = in_features)
    qweight  int32  [N, K // 8] 8 values of q per word, packed along K:
                                 bits 4*i .. 4*i+3 of qweight[n, j] hold q[n, 8*j + PACK_ORDER[i]]
    scales   [N, K // G]        one scale per group of G consecutive input channels, per output row
    zeros    [N, K // G]        one zero point per group, an integer 0..15 stored in scales.dtype

    dequantized weight  W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]
    computed in fp32 and rounded once to the activation dtype.

Rounding rule (every implementation of every op): round half to even, as `torch.round`.

Kernels may repack into private layouts at load time (see `repack_*` below); checkpoints always
keep the canonical one.
"""
from __future__ import annotations

import sys

import torch

# Nibble i of a packed int32 word holds element PACK_ORDER[i] of its 8 consecutive K-elements.
# The natural order: a kernel unpacks with (word >> (4 * i)) & 0xF.
PACK_ORDER = (0, 1, 2, 3, 4, 5, 6, 7)
VALUES_PER_WORD = 8
_SHIFTS = tuple(4 * i for i in range(VALUES_PER_WORD))
_LITTLE_ENDIAN = sys.byteorder == "little"  # where int32 words can be read as their four bytes


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack q (integer tensor [N, K], values 0..15, K % 8 == 0) into int32 [N, K // 8]."""
    if q.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D [N, K] tensor, got shape {tuple(q.shape)}")
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise TypeError(f"pack_int4 expects an integer tensor, got {q.dtype}")
    n, k = q.shape
    if k % VALUES_PER_WORD:
        raise ValueError(f"pack_int4: K={k} is not a multiple of {VALUES_PER_WORD}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_int4: values must lie in 0..15")
    order = torch.tensor(PACK_ORDER, device=q.device)
    q8 = q.to(torch.uint8).reshape(n, k // VALUES_PER_WORD, VALUES_PER_WORD)[..., order]  # nibble i of each word
    if _LITTLE_ENDIAN:
        # byte j of a word holds nibbles 2j (low half) and 2j + 1: one uint8 OR per byte, the bytes read
        # as int32 (little-endian: byte j = bits 8j .. 8j + 7), no int64 temporaries
        return (q8[..., 0::2] | (q8[..., 1::2] << 4)).contiguous().view(torch.int32).reshape(n, k // VALUES_PER_WORD)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=q.device)
    words = (q8.to(torch.int64) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32 range
    return words.to(torch.int32)


def nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> uint8 [..., W, 8]: nibble i (bits 4i .. 4i + 3) of each word."""
    if _LITTLE_ENDIAN:
        w = words.contiguous()
        if w.dim() and w.stride(-1) != 1:  # "contiguous", but a last dim of one element may have any stride
            w = w.clone(memory_format=torch.contiguous_format)  # (the transpose of a [1, G] tensor): view refuses it
        b = w.view(torch.uint8)  # [..., 4W], byte j of a word = bits 8j .. 8j + 7
        return torch.stack((b & 0xF, b >> 4), -1).reshape(*words.shape, VALUES_PER_WORD)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int32 [N, K // 8] -> uint8 [N, K]."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise TypeError(f"unpack_int4 expects int32 [N, K//8], got {qweight.dtype} {tuple(qweight.shape)}")
    n, kw = qweight.shape
    inv = [0] * VALUES_PER_WORD
    for i, p in enumerate(PACK_ORDER):
        inv[p] = i
    nib = nibbles(qweight)[..., torch.tensor(inv, device=qweight.device)]  # [N, K//8, 8], element order
    return nib.reshape(n, kw * VALUES_PER_WORD)


def num_groups(k: int, group_size: int) -> int:
    return 1 if group_size == -1 else k // group_size


def effective_group_size(k: int, group_size: int) -> int:
    """-1 (per output channel) means one group spanning all of K."""
    return k if group_size == -1 else group_size


def packed_bytes(n: int, k: int, group_size: int, scale_dtype: torch.dtype) -> int:
    """Bytes a canonical int4 weight occupies: qweight + scales + zeros."""
    g = num_groups(k, group_size)
    esize = torch.empty((), dtype=scale_dtype).element_size()
    return n * (k // VALUES_PER_WORD) * 4 + 2 * n * g * esize
