// Dense double-vector helpers shared by the per-problem kernels of the fused solver.
#pragma once

#include <cstdint>

namespace caffast {

// Four partial sums: with one accumulator the compiler must keep the strict order of the additions
// and can neither vectorize nor pipeline the loop, which is the solver's inner loop.
inline double dot(const double* a, const double* b, int64_t n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += a[j] * b[j];
    s1 += a[j + 1] * b[j + 1];
    s2 += a[j + 2] * b[j + 2];
    s3 += a[j + 3] * b[j + 3];
  }
  for (; j < n; ++j) s0 += a[j] * b[j];
  return (s0 + s1) + (s2 + s3);
}

}  // namespace caffast
