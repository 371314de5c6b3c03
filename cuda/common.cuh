// Shared helpers for the jax_ep CUDA kernels (no XLA, no Python here).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

// Evaluate a CUDA runtime call and return its error from the enclosing
// function (which must return cudaError_t) when it fails.
#define JAX_EP_CUDA_RETURN_IF_ERROR(expr)     \
  do {                                        \
    cudaError_t jax_ep_err_ = (expr);         \
    if (jax_ep_err_ != cudaSuccess) {         \
      return jax_ep_err_;                     \
    }                                         \
  } while (0)

namespace jax_ep {

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

template <typename T>
__host__ __device__ constexpr T round_up(T a, T b) {
  return ceil_div(a, b) * b;
}

}  // namespace jax_ep
