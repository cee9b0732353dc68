// The wgmma launcher's switches without a GPU (tests/test_csrc_w4a8_wgmma.py): csrc/w4a8_wgmma.cu linked as it is,
// MINICPM_INT4_W4A8_WGMMA read from the environment. Prints the two switches and the launch's result for blocks
// of 64, 128 and the launcher's choice (on a machine without a GPU, a launch that gets past the switches stops at
// cudaErrorNoKernelImageForDevice: the sm_90a build is not there).
#include <cuda_runtime.h>

#include <cstdio>

#include "../../csrc/launchers.h"
#include "../../csrc/w4a8_gemm_core.cuh"

cudaError_t minicpm_int4_w4a8_wgmma_launch(const minicpm_int4_w4a8::Params& p, bool fma, int block_tokens, int sms,
                                           cudaStream_t stream);

int main() {
  minicpm_int4_w4a8::Params p{};
  p.M = 10, p.N = 16, p.K = 256, p.G = 128, p.groups = 2;
  std::printf("disabled=%d t64_disabled=%d", minicpm_int4_w4a8_wgmma_disabled(), minicpm_int4_w4a8_wgmma_t64_disabled());
  for (int bt : {64, 128, 0})
    std::printf(" launch%d=%s", bt, cudaGetErrorName(minicpm_int4_w4a8_wgmma_launch(p, false, bt, 132, nullptr)));
  std::printf("\n");
  return 0;
}
