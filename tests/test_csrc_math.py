"""The CUDA decode kernel's int4 -> fp16/bf16 trick, checked bit for bit on the CPU.

csrc/w4a16_gemv.cu turns (word >> 4i) & 0x000F000F | MAGIC into a pair of fp16 (bf16) values
MAGIC_VALUE + q for nibbles i and i + 4, subtracts MAGIC_VALUE + z (exact) and multiplies by the
scale in the dtype (one rounding). This emulates those steps with torch's fp16/bf16 arithmetic and
checks that they equal the reference dequantization for every nibble value, zero point and a spread
of scales: so the kernel's math is the reference's, and only its indexing is left to the GPU tests.
"""
import pytest
import torch

from minicpm_int4.packing import pack_int4
from minicpm_int4.reference import dequantize_ref

MAGIC = {torch.float16: (0x64006400, 1024.0), torch.bfloat16: (0x43004300, 128.0)}


def _emulate_word(words: torch.Tensor, z: torch.Tensor, s: torch.Tensor, dtype) -> torch.Tensor:
    magic, magic_value = MAGIC[dtype]
    out = torch.empty(words.shape[0], 8, dtype=dtype)
    zm = (magic_value + z.float()).to(dtype)   # exact for z in 0..15
    for i in range(4):
        bits = ((words.long() >> (4 * i)) & 0x000F000F) | magic
        pair = bits.to(torch.int32).view(torch.int16).reshape(-1, 2).view(dtype)  # little endian: (.x, .y)
        deq = (pair - zm[:, None]) * s[:, None]   # dtype arithmetic: exact subtraction, one rounding
        out[:, i], out[:, i + 4] = deq[:, 0], deq[:, 1]
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_magic_number_dequant_equals_reference(dtype):
    g = torch.Generator().manual_seed(0)
    rows = 16 * 16 * 64
    q = torch.randint(0, 16, (rows, 8), generator=g, dtype=torch.uint8)
    q[:256, 0] = torch.arange(256) % 16                        # every nibble value in every slot
    z = (torch.arange(rows) % 16).to(dtype)                    # every zero point
    s = (torch.rand(rows, generator=g) * 10 ** torch.empty(rows).uniform_(-4, 1, generator=g)).to(dtype)
    words = pack_int4(q)[:, 0]
    got = _emulate_word(words, z, s, dtype)
    ref = dequantize_ref(pack_int4(q), s[:, None], z[:, None], 8, out_dtype=dtype)
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))  # bit for bit (incl. signed zeros)
