// The delta GEMM kernels for bf16 activations (one translation unit per type, so they compile in parallel).
#include "meswitch/cuda/delta_gemm.cuh"

namespace meswitch::cuda::kernels {

template cudaError_t launch_delta_gemm<__nv_bfloat16, 1>(const KernelExperts&, const KernelProblem&, dim3, cudaStream_t);
template cudaError_t launch_delta_gemm<__nv_bfloat16, 2>(const KernelExperts&, const KernelProblem&, dim3, cudaStream_t);
template cudaError_t launch_delta_gemm<__nv_bfloat16, 4>(const KernelExperts&, const KernelProblem&, dim3, cudaStream_t);

}  // namespace meswitch::cuda::kernels
