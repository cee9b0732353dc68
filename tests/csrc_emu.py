"""Build and load tests/csrc/host_emu.cu: the CUDA kernels' own per-thread / per-warp code compiled
for the host (nvcc, no GPU), called through ctypes; and buffers that end at an inaccessible page.

Needs nvcc. CI has it; elsewhere the tests that use it skip, unless MINICPM_INT4_REQUIRE_NVCC=1,
which .ci/run sets so that they can never skip there.
"""
import ctypes
import mmap
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU_SRC = os.path.join(ROOT, "tests", "csrc", "host_emu.cu")


def build(out_dir) -> ctypes.CDLL:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("MINICPM_INT4_REQUIRE_NVCC") == "1":
            pytest.fail("MINICPM_INT4_REQUIRE_NVCC=1 but nvcc is not on PATH")
        pytest.skip("needs nvcc to build the CUDA kernels' host emulation")
    lib = os.path.join(str(out_dir), "host_emu.so")
    # -arch=sm_80: the device pass nvcc makes anyway must see bf16 arithmetic; only host code is run
    cmd = [nvcc, "-std=c++17", "-O2", "-shared", "-arch=sm_80", "-Xcompiler", "-fPIC,-Wall,-Werror", "-o", lib, EMU_SRC]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}"
    so = ctypes.CDLL(lib)
    # the last arguments of each emulation: the input scale's pointer, or None; then (tensor-core
    # kernel and quantizer) the channel order's, or None; then (tensor-core kernel) the mode: 1 variant 3, 2 variant 4
    gemv_args = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 4 + [ctypes.c_long] * 2 + [ctypes.c_int] * 3
    so.minicpm_int4_gemv_emulate.argtypes = gemv_args + [ctypes.c_void_p]
    so.minicpm_int4_mma_emulate.argtypes = gemv_args + [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    so.minicpm_int4_act_quant_emulate.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_long]
                                                  + [ctypes.c_int] * 2 + [ctypes.c_void_p] * 2)
    so.minicpm_int4_w4a8_emulate.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int] * 4 + [ctypes.c_long] + [ctypes.c_int] * 4
    so.minicpm_int4_w4a8_supported.argtypes = [ctypes.c_int] * 2
    so.minicpm_int4_w4a8_wgmma_emulate.argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int] * 4 + [ctypes.c_long]
                                                   + [ctypes.c_int] * 5)
    so.minicpm_int4_w4a8_wgmma_supported.argtypes = [ctypes.c_int] * 2
    so.minicpm_int4_w4a16_wgmma_emulate.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_int] * 4 + [ctypes.c_long] * 2
                                                    + [ctypes.c_int] * 4)
    so.minicpm_int4_w4a16_wgmma_split_k.argtypes = [ctypes.c_int] * 4
    so.minicpm_int4_w4a16_wgmma_supported.argtypes = [ctypes.c_int] * 2
    so.minicpm_int4_w4a16_wgmma_block_tokens.argtypes = [ctypes.c_int] * 3
    so.minicpm_int4_w4a8_wgmma_tile.argtypes = [ctypes.c_int] * 5
    so.minicpm_int4_w4a8_wgmma_cta_tiles.argtypes = [ctypes.c_int] * 5
    so.minicpm_int4_w4a8_wgmma_grid.argtypes = [ctypes.c_int] * 4
    so.minicpm_int4_w4a8_wgmma_block_tokens.argtypes = [ctypes.c_int] * 3
    so.minicpm_int4_w4a8_magic_convert.argtypes = [ctypes.c_int]
    so.minicpm_int4_w4a8_block_tile.argtypes = [ctypes.c_int] * 4
    so.minicpm_int4_w4a8_block_rows.argtypes = [ctypes.c_int] * 3
    so.minicpm_int4_w4a8_static_group_tiles.argtypes = [ctypes.c_int] * 2
    for f in (so.minicpm_int4_w4a16_wgmma_emulate, so.minicpm_int4_w4a16_wgmma_supported,
              so.minicpm_int4_w4a16_wgmma_block_tokens, so.minicpm_int4_w4a16_wgmma_split_k, so.minicpm_int4_w4a8_wgmma_emulate, so.minicpm_int4_w4a8_wgmma_supported,
              so.minicpm_int4_w4a8_wgmma_tile, so.minicpm_int4_w4a8_wgmma_cta_tiles, so.minicpm_int4_w4a8_wgmma_grid,
              so.minicpm_int4_w4a8_wgmma_block_tokens,
              so.minicpm_int4_w4a8_emulate, so.minicpm_int4_w4a8_supported, so.minicpm_int4_w4a8_magic_convert,
              so.minicpm_int4_w4a8_block_tile, so.minicpm_int4_w4a8_static_group_tiles, so.minicpm_int4_w4a8_block_rows,
              so.minicpm_int4_gemv_emulate, so.minicpm_int4_mma_emulate, so.minicpm_int4_act_quant_emulate,
              so.minicpm_int4_gemv_chunk_shift, so.minicpm_int4_gemv_rows_per_block, so.minicpm_int4_mma_supported,
              so.minicpm_int4_mma_post_scale, so.minicpm_int4_mma_tiles_per_block, so.minicpm_int4_mma_warps_per_block,
              so.minicpm_int4_mma_warps_for_launch):
        f.restype = ctypes.c_int
    return so


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PAGE = mmap.PAGESIZE
_keep = []  # the mappings behind guarded tensors stay mapped until the process ends


def guarded(t: torch.Tensor) -> torch.Tensor:
    """A copy of contiguous `t` whose last byte is followed by an inaccessible page: a kernel that
    reads past the end kills the test run instead of passing unnoticed."""
    nbytes = t.numel() * t.element_size()
    data_pages = max(1, -(-nbytes // _PAGE))
    mm = mmap.mmap(-1, (data_pages + 1) * _PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    if _libc.mprotect(base + data_pages * _PAGE, _PAGE, 0) != 0:  # PROT_NONE
        raise OSError(ctypes.get_errno(), "mprotect failed")
    _keep.append(mm)
    start = data_pages * _PAGE - nbytes
    out = torch.frombuffer(mm, dtype=t.dtype, count=t.numel(), offset=start).view(t.shape)
    out.copy_(t)
    return out
