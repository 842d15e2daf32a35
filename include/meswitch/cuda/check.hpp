// Every CUDA runtime call is checked by one macro, and a failure is an exception that
// says which call failed, where, with the runtime's own name for the error and what
// meswitch was doing:
//
//   MESWITCH_CUDA_CHECK(cudaMemcpyAsync(...), "uploading delta '" + name + "'");
//   -> meswitch::cuda::CudaError: uploading delta 'layer.w': cudaMemcpyAsync(...) failed
//      with cudaErrorInvalidValue (invalid argument) at cuda/device_memory.hpp:42
//
// The context expression is evaluated only on failure, so building it costs nothing on
// the fast path. Launch errors are caught by checking cudaGetLastError() right after
// the launch; errors of the kernel itself surface at the next synchronizing call.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "meswitch/error.hpp"

namespace meswitch::cuda {

class CudaError : public Error {
 public:
  CudaError(cudaError_t code, const std::string& message) : Error(message), code_(code) {}
  cudaError_t code() const noexcept { return code_; }

 private:
  cudaError_t code_;
};

namespace detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t code, const char* call, const char* file, int line,
                                          const std::string& context) {
  std::string message = context.empty() ? std::string() : context + ": ";
  message += std::string(call) + " failed with " + cudaGetErrorName(code) + " (" + cudaGetErrorString(code) + ") at " +
             file + ":" + std::to_string(line);
  throw CudaError(code, message);
}

}  // namespace detail
}  // namespace meswitch::cuda

#define MESWITCH_CUDA_CHECK(call, context)                                                            \
  do {                                                                                                \
    const cudaError_t meswitch_cuda_status_ = (call);                                                 \
    if (meswitch_cuda_status_ != cudaSuccess)                                                         \
      ::meswitch::cuda::detail::throw_cuda_error(meswitch_cuda_status_, #call, __FILE__, __LINE__, (context)); \
  } while (0)
