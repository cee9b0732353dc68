import pytest
import torch
from hypothesis import given, settings, strategies as st

from minicpm_int4 import packing
from minicpm_int4.packing import PACK_ORDER, nibbles, pack_int4, packed_bytes, unpack_int4


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), kw=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(n, kw, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, kw * 8), generator=g, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (n, kw)
    assert torch.equal(unpack_int4(packed), q)


def test_pack_takes_any_integer_dtype_and_strides():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (24, 40), generator=g, dtype=torch.int64)
    want = pack_int4(q.to(torch.uint8))
    for variant in (q, q.to(torch.int32), q.t().contiguous().t(), q.to(torch.uint8).t().contiguous().t()):
        assert torch.equal(pack_int4(variant), want)
    # against the layout's definition, word by word: sum of q << 4i in 64-bit, read as int32
    words = sum(q.reshape(24, 5, 8)[..., PACK_ORDER[i]] << (4 * i) for i in range(8))
    assert torch.equal(want, torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))


def test_nibble_order_is_documented_layout():
    q = torch.arange(8, dtype=torch.uint8).reshape(1, 8) + 8  # 8..15, top nibble has bit 3 set
    word = pack_int4(q)[0, 0].item() & 0xFFFFFFFF
    for i in range(8):
        assert (word >> (4 * i)) & 0xF == q[0, PACK_ORDER[i]].item()


def test_the_byte_order_free_path_packs_and_unpacks_the_same_words(monkeypatch):
    """On a little-endian host (every one the tests run on) pack_int4 and nibbles read a word as its four bytes;
    elsewhere they shift in 64 / 32 bits: forced here, the same words from the same values and back - the top
    nibble >= 8 (a negative int32) included - and a [1, G] transpose, whose last dimension has any stride."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (17, 40), generator=g, dtype=torch.uint8)
    q[:, 7::8] = torch.randint(8, 16, (17, 5), generator=g, dtype=torch.uint8)
    words, values, column = pack_int4(q), nibbles(pack_int4(q)), pack_int4(q)[:1, :].t()
    assert packing._LITTLE_ENDIAN and (words < 0).all()
    monkeypatch.setattr(packing, "_LITTLE_ENDIAN", False)
    assert torch.equal(pack_int4(q), words)
    assert torch.equal(nibbles(words), values) and torch.equal(unpack_int4(words), q)
    assert torch.equal(nibbles(column), values[0][:, None])


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.full((1, 8), 16, dtype=torch.int32))
    with pytest.raises(TypeError, match="integer"):
        pack_int4(torch.zeros(1, 8))
    with pytest.raises(ValueError, match=r"2-D \[N, K\] tensor, got shape \(8,\)"):
        pack_int4(torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="int32"):
        unpack_int4(torch.zeros(1, 1, dtype=torch.int64))


def test_packed_bytes():
    # 4096 x 4096, g128, fp16: K/2 bytes per row of q plus two fp16 per group
    assert packed_bytes(4096, 4096, 128, torch.float16) == 4096 * 2048 + 2 * 4096 * 32 * 2
    assert packed_bytes(64, 256, -1, torch.bfloat16) == 64 * 128 + 2 * 64 * 2
