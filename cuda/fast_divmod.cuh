// Division by a divisor known on the host, as a multiply-high, an add and a shift on the device. A division by a
// run-time value compiles to ~20 instructions around a MUFU reciprocal and two conversions, all on the SM's narrow
// transcendental pipe: when every warp of a grid runs such a chain at its start (block index by a split count, an
// expert id by the experts per rank), they queue there before the first address is known. Measured on one H200 (R=2,
// ranks under MPS; the combine send's prologue had four chained divisions): the send with no rows to send went from
// 4.0-4.2 to 3.1-3.3 us, the standard rounds' send from 10.6-11.5 to 9.9-10.3 (docs/low_latency.md, 22nd session).
#pragma once

#include <cstdint>

namespace jax_ep {

// Exact for 0 <= n < 2^31 and 1 <= divisor < 2^31 (the round-up method: shift = ceil(log2 d), then
// n / d = (umulhi(n, mul) + n) >> shift with mul = floor(2^32 (2^shift - d) / d) + 1). A divisor below 1 is taken as
// 1: the combine send's R - 1 at R = 1, where it has no unit to divide.
struct FastDivmod {
  int divisor = 1;
  uint32_t multiplier = 0;
  uint32_t shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(int d) : divisor(d < 1 ? 1 : d) {
    while ((1u << shift) < static_cast<uint32_t>(divisor)) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - divisor)) / divisor + 1);
  }

  // The host build computes the same (jax_ep._C.fast_divide, checked against // by tests/test_fast_divmod.py).
#ifdef __CUDACC__
  __host__ __device__
#endif
  inline int div(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#ifdef __CUDA_ARCH__
    const uint32_t high = __umulhi(u, multiplier);
#else
    const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(u) * multiplier) >> 32);
#endif
    return static_cast<int>((high + u) >> shift);
  }

  struct QuotientRemainder {
    int quotient, remainder;
  };
#ifdef __CUDACC__
  __host__ __device__
#endif
  inline QuotientRemainder divmod(int n) const {
    const int q = div(n);
    return {q, n - q * divisor};
  }
};

}  // namespace jax_ep
