// Errors the XLA FFI handlers return: bad arguments name the custom-call target; launch failures carry
// the CUDA error. Shared by every handler file.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_ep {

inline xla::ffi::Error Fail(const char* target, const std::string& what) {
  return xla::ffi::Error::InvalidArgument(std::string(target) + ": " + what);
}

inline xla::ffi::Error Launched(const char* target, cudaError_t err) {
  if (err == cudaSuccess) return xla::ffi::Error::Success();
  return xla::ffi::Error::Internal(std::string(target) + ": kernel launch failed: " + cudaGetErrorName(err) + ": " +
                                   cudaGetErrorString(err));
}

}  // namespace jax_ep
