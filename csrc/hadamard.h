// The Hadamard filter of L2-CAF, out = features * f / ||f|| per problem (f broadcast over channels),
// and its gradient with respect to f; float and double.
#pragma once

#include <cstdint>

namespace caffast {

// features (P, C, HW), filter (P, HW) -> out (P, C, HW).
template <class T>
void hadamard_forward(const T* features, const T* filter, int64_t problems, int64_t channels,
                      int64_t cells, T* out, int threads);

// grad_filter (P, HW) from grad_out (P, C, HW).
template <class T>
void hadamard_backward(const T* features, const T* filter, const T* grad_out, int64_t problems,
                       int64_t channels, int64_t cells, T* grad_filter, int threads);

}  // namespace caffast
