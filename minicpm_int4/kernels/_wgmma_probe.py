"""A plain tiled GEMM, compiled by kernels/aot.py for sm_90a with an fp32 and with an int32 accumulator, to
read off how many wgmma groups this Triton keeps in flight for each (aot.wgmma_in_flight_by_accumulator).

Why: Triton's WGMMA pipeliner (lib/Dialect/TritonGPU/Transforms/Pipeliner/WGMMAPipeline.cpp,
dotCanBeProperlyAsync, "rule 2.1") makes a dot "properly async" only when its accumulator is fp32; an int8
dot (int32 accumulator) gets `wgmma.wait_group 0` right after it, so the next K step's loads and unpacking
wait for the tensor cores and the tensor cores for them - in any kernel, W4A8's included. Compiled with
triton 3.6 and 3.9, this probe keeps 1 wgmma in flight with fp16 inputs and 0 with int8 ones.
"""
import triton
import triton.language as tl


@triton.jit
def _probe_gemm(a_ptr, b_ptr, c_ptr, K, ACC_INT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc_dtype = tl.int32 if ACC_INT else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for k in range(0, K, BLOCK_K):  # a: [M, K], b: [K, N] (N contiguous), both 16-byte aligned
        a = tl.load(a_ptr + offs_m[:, None] * K + (k + offs_k)[None, :])
        b = tl.load(b_ptr + (k + offs_k)[:, None] * (tl.num_programs(1) * BLOCK_N) + offs_n[None, :])
        acc = tl.dot(a, b, acc, out_dtype=acc_dtype)
    tl.store(c_ptr + offs_m[:, None] * (tl.num_programs(1) * BLOCK_N) + offs_n[None, :], acc.to(tl.float32))
