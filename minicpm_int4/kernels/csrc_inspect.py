"""Compile the CUDA extension's kernels (csrc/*.cu) for a GPU that is not here and read the SASS.

The counterpart of kernels/aot.py for the hand-written kernels: plain `nvcc -cubin` (with the
flags torch's CUDAExtension adds) for sm_80 / sm_90a, then `cuobjdump` for every instantiation's
registers, spills and shared memory, and the instructions its K loop issues per int4 weight - the
figure that decides whether a decode kernel can keep up with HBM (an H100 SXM issues about
4.6 thread-instructions per weight at full memory bandwidth: 132 SMs x 4 schedulers x 32 lanes x
1.83 GHz over 3.35 TB/s x 2 weights per byte). Static facts of the compiled code, not timings.

    minicpm-int4 inspect-cuda [--arch sm80,sm90a] [--json out.json]
    (or python -m minicpm_int4.kernels.csrc_inspect)

Needs nvcc and a source checkout (csrc/ beside the package); cuobjdump from CUDA or Triton's copy.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from collections import Counter
from typing import Dict, List, Optional, Sequence

from .sass import loop_bodies

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
ARCHS = {"sm80": "80", "sm90a": "90a"}
# csrc/w4a8_gemm_core.cuh: a warp's tile is 64 rows of x x 32 rows of W, a stage 128 k (4 k-tiles of 16 IMMA)
W4A8_WARP_ROWS, W4A8_WARP_W_ROWS, W4A8_STAGE_K, W4A8_STAGE_IMMA = 64, 32, 128, 64
W4A16_WG_STAGE_K = 64  # csrc/w4a16_wgmma_core.cuh kBK
_DTYPES = {"6__half": "float16", "13__nv_bfloat16": "bfloat16", "f": "float32"}


@dataclass
class Variant:
    arch: str
    kernel: str                  # "gemv" (CUDA cores), "mma" (tensor cores), "act_quant", "w4a8" (int8 tensor cores),
                                 # "w4a8-wg" (int8 warpgroup MMA, sm_90a), "w4a16-wg" (the W4A16 prefill GEMM on
                                 # fp16 / bf16 warpgroup MMA, sm_90a)
    dtype: str
    params: Dict[str, int]       # gemv: MT (rows of x), R (rows per block); mma: NT, NB, POST, W (warps); act_quant: U;
                                 # all: S (1: the layer's input scale multiplied into the loads of x);
                                 # mma, act_quant: P (1: x read through an act-order layer's channel order);
                                 # mma: A (chunks of W requested ahead: 1, or 2 for launcher variant 3; 4 with
                                 # RING = 1: launcher variant 4, cp.async into a 4-slot ring in shared memory);
                                 # w4a8: WM (warps along M), GT (k-tiles per group at compile time, 0: run
                                 # time), MAGIC, NARROW; w4a8-wg: GT, FMA (fused epilogue),
                                 # BM (tokens a block: the wgmma's N, 128 or 64), NARROW; w4a16-wg: BM (128 or
                                 # 256), GS (groups a 64-k stage: 2 for G = 32), SPLIT (1: split-K over a cluster)
    regs: int
    spill_bytes: int             # STACK + LOCAL from cuobjdump -res-usage (the whole kernel)
    smem: int
    loop_counts: Dict[str, int] = field(default_factory=dict)
    weights_per_trip: Optional[float] = None  # int4 weights one thread handles per trip of the loop (decode kernels)

    @property
    def instr_per_weight(self) -> Optional[float]:
        if not self.loop_counts or not self.weights_per_trip:
            return None
        return sum(self.loop_counts.values()) / self.weights_per_trip

    @property
    def loop_local_memory(self) -> int:
        """Local-memory loads and stores inside the K loop (a spill that costs every trip)."""
        return sum(c for op, c in self.loop_counts.items() if op.startswith(("LDL", "STL")))

    @property
    def rows_of_x(self) -> int:
        if self.kernel == "w4a8":
            return W4A8_WARP_ROWS
        if self.kernel in ("w4a8-wg", "w4a16-wg"):
            return self.params["BM"]  # the wgmma's N: tokens a warpgroup's A is used for
        return self.params.get("MT", 8 * self.params.get("NB", 1))

    @property
    def instr_per_mma(self) -> Optional[float]:
        """SASS instructions the loop issues per tensor-core instruction (HMMA / IMMA) in it."""
        mma = sum(c for op, c in self.loop_counts.items() if op.startswith(("HMMA", "IMMA", "IGMMA", "HGMMA")))
        return sum(self.loop_counts.values()) / mma if mma else None


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    raise RuntimeError(f"{name} not found (install the CUDA toolkit, or triton which bundles cuobjdump)")


RING_DEPTH = 4  # csrc/w4a16_mma_core.cuh kRingDepth


def _variant(arch: str, name: str, regs: int, spill: int, smem: int, sass: str) -> Optional[Variant]:
    m = re.search(r"w4a16_gemv_kernelI(\d+__\w+?)Li(\d+)ELi(\d+)ELb([01])E", name)
    if m:
        v = Variant(arch, "gemv", _DTYPES[m.group(1)], {"MT": int(m.group(2)), "R": int(m.group(3)),
                                                        "S": int(m.group(4))}, regs, spill, smem)
        mt, r = v.params["MT"], v.params["R"]
        # the fast loop: R weight loads and 4 * MT x loads (16 bytes each) per trip, and 4 of the input
        # scale with S; of the loops that fit, the one with the most trips per iteration (the unrolled
        # body, not a remainder loop)
        per_trip = r + 4 * mt + 4 * v.params["S"]
        best = None
        for loop in loop_bodies(sass):
            wide = sum(c for op, c in loop.items() if op.startswith("LDG") and ".128" in op)
            if wide and wide % per_trip == 0 and (best is None or wide > best[0]):
                best = (wide, loop)
        if best:
            v.loop_counts, v.weights_per_trip = dict(best[1]), 32.0 * r * best[0] // per_trip
        return v
    m = re.search(r"w4a16_mma_kernelI(\d+__\w+?)Li(\d+)ELi(\d+)ELb([01])ELi(\d+)ELb([01])ELb([01])ELi(\d+)E", name)
    ring = re.search(r"w4a16_mma_ring_kernelI(\d+__\w+?)Li(\d+)ELi(\d+)ELb([01])ELi(\d+)E", name)
    if m or ring:
        if ring:  # plain x only; A = the ring's slots (csrc/w4a16_mma_core.cuh kRingDepth)
            groups = ring.groups() + ("0", "0", str(RING_DEPTH))
        else:
            groups = m.groups()
        v = Variant(arch, "mma", _DTYPES[groups[0]], {"NT": int(groups[1]), "NB": int(groups[2]),
                                                      "POST": int(groups[3]), "W": int(groups[4]),
                                                      "S": int(groups[5]), "P": int(groups[6]),
                                                      "A": int(groups[7])}, regs, spill, smem)
        if ring:
            v.params["RING"] = 1
        nt, nb = v.params["NT"], v.params["NB"]
        best = None  # the loop with the most tensor-core ops: 8 * NT * NB per 128-k chunk
        for loop in loop_bodies(sass):
            mma = sum(c for op, c in loop.items() if op.startswith("HMMA"))
            if mma and mma % (8 * nt * nb) == 0 and (best is None or mma > best[0]):
                best = (mma, loop)
        if best:  # a chunk: 16 * NT rows x 128 k per warp = 64 * NT weights per thread
            v.loop_counts, v.weights_per_trip = dict(best[1]), 64.0 * nt * best[0] // (8 * nt * nb)
        return v
    m = re.search(r"w4a8_gemm_kernelILi(\d+)ELi(\d+)ELb([01])ELb([01])E(\d+__\w+?|f)E", name)
    if m:  # WM: warps along M (2: 128-row blocks, 1: 64); GT: k-tiles per group placed at compile time (0: at
        # run time); MAGIC int -> fp32; NARROW 8-byte W copies; dtype: of the scales and zero points (x is int8)
        v = Variant(arch, "w4a8", _DTYPES[m.group(5)], {"WM": int(m.group(1)), "GT": int(m.group(2)),
                                                       "MAGIC": int(m.group(3)), "NARROW": int(m.group(4)), "S": 0},
                    regs, spill, smem)
        best = None  # the stage loop: 64 IMMA per 128-k stage
        for loop in loop_bodies(sass):
            mma = sum(c for op, c in loop.items() if op.startswith("IMMA"))
            if mma and mma % W4A8_STAGE_IMMA == 0 and (best is None or mma > best[0]):
                best = (mma, loop)
        if best:  # a stage: 32 rows of W x 128 k per warp, unpacked by its 32 lanes
            stages = best[0] // W4A8_STAGE_IMMA
            v.loop_counts, v.weights_per_trip = dict(best[1]), stages * W4A8_WARP_W_ROWS * W4A8_STAGE_K / 32.0
        return v
    m = re.search(r"w4a8_wgmma_kernelILi(\d+)ELb([01])E(\d+__\w+?|f)Li(\d+)ELb([01])E", name)
    if m:  # sm_90a only (elsewhere the kernel is a stub the launcher never starts); GT as w4a8's; FMA: the
        # epilogue's multiply and add fused (the op's kernel=3); BM: tokens a block (m64n128k32 or m64n64k32);
        # NARROW: W copied 8 bytes at a time (per channel with K % 32 == 16)
        if arch != "sm90a":
            return None
        v = Variant(arch, "w4a8-wg", _DTYPES[m.group(3)], {"GT": int(m.group(1)), "FMA": int(m.group(2)),
                                                          "BM": int(m.group(4)), "NARROW": int(m.group(5)), "S": 0},
                    regs, spill, smem)
        best = None  # the stage loop: 4 IGMMA (m64nBMk32) per warpgroup per 128-k stage
        for loop in loop_bodies(sass):
            mma = sum(c for op, c in loop.items() if op.startswith("IGMMA"))
            if mma and mma % 4 == 0 and (best is None or mma > best[0]):
                best = (mma, loop)
        if best:  # a stage: 64 rows of W x 128 k per warpgroup, unpacked by its 128 threads
            v.loop_counts, v.weights_per_trip = dict(best[1]), best[0] // 4 * 64 * W4A8_STAGE_K / 128.0
        return v
    m = re.search(r"w4a16_wgmma_kernelI(\d+__\w+?)Li(\d+)ELi(\d+)ELb([01])EE", name)
    if m:  # sm_90a only (elsewhere a stub); BM: tokens a block (m64n128k16 or m64n256k16); GS: groups a 64-k stage;
        # SPLIT: split-K (a tile a cluster of CTAs, 128-token blocks)
        if arch != "sm90a":
            return None
        v = Variant(arch, "w4a16-wg", _DTYPES[m.group(1)], {"BM": int(m.group(2)), "GS": int(m.group(3)),
                                                            "SPLIT": int(m.group(4)), "S": 0}, regs, spill, smem)
        best = None  # the stage loop: both of its branches (A set 0 / 1), 4 HGMMA (m64nBMk16) each
        for loop in loop_bodies(sass):
            mma = sum(c for op, c in loop.items() if op.startswith("HGMMA"))
            if mma and mma % 8 == 0 and (best is None or mma > best[0]):
                best = (mma, loop)
        if best:  # a stage: 64 rows of W x 64 k per warpgroup, dequantized by its 128 threads; the loop's code holds
            # two stages' (one a trip runs), so its instructions a weight are about one stage's
            v.loop_counts, v.weights_per_trip = dict(best[1]), best[0] // 4 * 64 * W4A16_WG_STAGE_K / 128.0
        return v
    m = re.search(r"act_quant_kernelI(\d+__\w+?|f)Li(\d+)ELb([01])ELb([01])E", name)
    if m:  # no K loop per weight: registers, stack, and local memory in its loops
        v = Variant(arch, "act_quant", _DTYPES[m.group(1)], {"U": int(m.group(2)), "S": int(m.group(3)),
                                                             "P": int(m.group(4))}, regs, spill, smem)
        v.loop_counts = dict(sum(loop_bodies(sass), Counter()))
        return v
    return None


def inspect(archs: Sequence[str] = ("sm80", "sm90a"),
            sources: Sequence[str] = ("w4a16_gemv.cu", "w4a16_wgmma.cu", "act_quant.cu", "w4a8_gemm.cu",
                                      "w4a8_wgmma.cu")) -> List[Variant]:
    out: List[Variant] = []
    for source in sources:
        out += _inspect_source(archs, source)
    out.sort(key=lambda v: (v.arch, v.kernel, v.dtype, sorted(v.params.items())))
    return out


def _inspect_source(archs: Sequence[str], source: str) -> List[Variant]:
    nvcc, cuobjdump = _tool("nvcc"), _tool("cuobjdump")
    src = os.path.join(CSRC, source)
    if not os.path.exists(src):
        raise RuntimeError(f"{src} not found: run from a source checkout of minicpm_int4")
    out: List[Variant] = []
    with tempfile.TemporaryDirectory() as d:
        for arch in archs:
            sm = ARCHS[arch]
            cubin = os.path.join(d, f"{arch}.cubin")
            done = subprocess.run([nvcc, "-std=c++17", "-O3", "-cubin", "-gencode", f"arch=compute_{sm},code=sm_{sm}",
                                   *TORCH_NVCC_FLAGS, "-o", cubin, src], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed for {arch}:\n{done.stderr[-3000:]}")
            usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True).stdout
            res = {m.group(1): (int(m.group(2)), int(m.group(3)) + int(m.group(5)), int(m.group(4)))
                   for m in re.finditer(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)}
            sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
            for part in re.split(r"\n\s*Function : ", sass)[1:]:
                name = part.split("\n", 1)[0].strip()
                regs, spill, smem = res.get(name, (0, 0, 0))
                v = _variant(arch, name, regs, spill, smem, part)
                if v is not None:
                    out.append(v)
    return out


def format_table(variants: Sequence[Variant]) -> str:
    lines = ["| arch | kernel | dtype | instantiation | regs | stack B | local-memory ops in the loop | smem B | "
             "loop instr / weight | per weight and row of x (MT, or 8 x NB; w4a8: 64; w4a8-wg: BM) | loop instr / mma |",
             "|" + "---|" * 11]
    for v in variants:
        ipw, ipm = v.instr_per_weight, v.instr_per_mma
        per_row = "-" if ipw is None else f"{ipw / v.rows_of_x:.2f}"
        inst = " ".join(f"{k}={val}" for k, val in v.params.items() if not (v.kernel.startswith("w4a8") and k == "S"))
        lines.append(f"| {v.arch} | {v.kernel} | {v.dtype} | {inst} | {v.regs} | {v.spill_bytes} | "
                     f"{v.loop_local_memory} | {v.smem} | "
                     f"{'-' if ipw is None else f'{ipw:.2f}'} | {per_row} | {'-' if ipm is None else f'{ipm:.1f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="minicpm-int4 inspect-cuda", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm80,sm90a", help=f"comma-separated, from {sorted(ARCHS)}")
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    archs = [a for a in args.arch.split(",") if a]
    if not archs or any(a not in ARCHS for a in archs):  # before nvcc starts: argparse's one-line error
        p.error(f"--arch {args.arch!r}: choose from {sorted(ARCHS)}")
    try:
        variants = inspect(archs)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(variants))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(v) | {"instr_per_weight": v.instr_per_weight, "loop_local_memory": v.loop_local_memory,
                                    "instr_per_mma": v.instr_per_mma} for v in variants], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
