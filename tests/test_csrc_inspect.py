"""The CUDA extension's kernels compiled for sm_80 / sm_90a without a GPU (kernels/csrc_inspect.py).

Static facts of the compiled code, so regressions show up in CI before any GPU session:
- every instantiation the launchers can pick exists, with no local-memory traffic in its K loop
  (ptxas may park a loop-invariant value for the epilogue: a few bytes of stack, read once);
- the decode kernels' K loops stay inside the instruction budget of HBM speed. An H100 SXM issues
  132 SMs x 4 schedulers x 32 lanes x 1.83 GHz = 30.9 T thread-instructions/s and streams
  3.35 TB/s x 2 = 6.7 T int4 weights/s, so a kernel that spends more than ~4.6 instructions per
  weight cannot run at memory speed whatever its loads do (an A100: 108 x 4 x 32 x 1.41 GHz over
  2.04 TB/s x 2 = 4.8). The kernels used at M = 1 must stay under 4.6 on sm_90a;
- the tensor-core kernel, which "auto" prefers, stays cheaper per weight than the CUDA-core GEMV.
"""
import os
import shutil

import pytest

from minicpm_int4.kernels import csrc_inspect

HBM_BUDGET = 4.6  # instructions per weight, H100 SXM (docstring)


@pytest.fixture(scope="module")
def variants():
    if shutil.which("nvcc") is None:
        if os.environ.get("MINICPM_INT4_REQUIRE_NVCC") == "1":
            pytest.fail("MINICPM_INT4_REQUIRE_NVCC=1 but nvcc is not on PATH")
        pytest.skip("needs nvcc")
    return csrc_inspect.inspect(["sm80", "sm90a"])


def _pick(variants, arch, kernel, dtype=None, **params):
    return [v for v in variants if v.arch == arch and v.kernel == kernel and (dtype is None or v.dtype == dtype)
            and all(v.params[k] == val for k, val in params.items())]


def test_every_instantiation_compiles_without_spills_in_the_loop(variants):
    for arch in ("sm80", "sm90a"):
        for dtype in ("float16", "bfloat16"):
            gemv = _pick(variants, arch, "gemv", dtype)
            # (MT, R) with MT * R <= 8, R in 1, 2, 4, 8: what csrc/w4a16_gemv.cu's launch_mt can pick
            assert sorted((v.params["MT"], v.params["R"]) for v in gemv) == sorted(
                (mt, r) for mt in range(1, 9) for r in (1, 2, 4, 8) if mt * r <= 8)
            mma = _pick(variants, arch, "mma", dtype)
            # (NT, W): 2 tiles x 8 warps, 1 tile x 8 or 16 warps (launch_mma_nb)
            assert sorted((v.params["NT"], v.params["W"], v.params["NB"], v.params["POST"]) for v in mma) == sorted(
                (nt, w, nb, post) for nt, w in ((2, 8), (1, 8), (1, 16)) for nb in (1, 2) for post in (0, 1))
    spilled = [(v.arch, v.kernel, v.dtype, v.params, v.spill_bytes) for v in variants
               if v.loop_local_memory or v.spill_bytes > 16]
    assert not spilled
    for arch in ("sm80", "sm90a"):  # act_quant: (dtype, 16-byte pieces cached per thread), 0 = read twice
        assert sorted((v.dtype, v.params["U"]) for v in _pick(variants, arch, "act_quant")) == sorted(
            (d, u) for d in ("float16", "bfloat16", "float32") for u in (0, 1, 2, 4, 8))
    missing = [(v.arch, v.kernel, v.dtype, v.params) for v in variants
               if v.kernel != "act_quant" and v.instr_per_weight is None]
    assert not missing, f"K loop not found in {missing}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_decode_kernels_within_the_hbm_instruction_budget(variants, dtype):
    for v in _pick(variants, "sm90a", "gemv", dtype, MT=1):
        if v.params["R"] >= 4:  # what the launcher picks for N >= 2112 on 132 SMs
            assert v.instr_per_weight < HBM_BUDGET, (v.params, v.instr_per_weight)
    for v in _pick(variants, "sm90a", "mma", dtype):  # every M up to 16
        assert v.instr_per_weight < HBM_BUDGET, (v.params, v.instr_per_weight)


@pytest.mark.parametrize("arch", ["sm80", "sm90a"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tensor_core_kernel_cheaper_than_gemv(variants, arch, dtype):
    best_gemv = min(v.instr_per_weight for v in _pick(variants, arch, "gemv", dtype, MT=1))
    for v in _pick(variants, arch, "mma", dtype, NB=1):
        assert v.instr_per_weight < best_gemv, (v.params, v.instr_per_weight, best_gemv)
