// MESWITCH_HOST_DEVICE: a function the host compiler and nvcc both compile, so the
// index arithmetic and dequantization the CUDA kernels use is the very code the host
// tests check (tests/cpp/test_cuda_tile_layout.cpp runs without a GPU or nvcc).
#pragma once

#if defined(__CUDACC__)
#define MESWITCH_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MESWITCH_HOST_DEVICE inline
#endif
