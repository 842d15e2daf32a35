// The delta GEMM kernels for f16 activations (one translation unit per type, so they compile in parallel).
#include "meswitch/cuda/delta_gemm.cuh"

namespace meswitch::cuda::kernels {

template cudaError_t launch_delta_gemm<__half, 1>(const KernelExperts&, const KernelProblem&, dim3, cudaStream_t);
template cudaError_t launch_delta_gemm<__half, 2>(const KernelExperts&, const KernelProblem&, dim3, cudaStream_t);
template cudaError_t launch_delta_gemm<__half, 4>(const KernelExperts&, const KernelProblem&, dim3, cudaStream_t);

}  // namespace meswitch::cuda::kernels
