// The L2-projected SGD step on its own, for backends that compute grad_g some other way (autograd
// through a real tail) but want the reference's update on the sphere without a second autograd pass.
#pragma once

#include <cstdint>

namespace caffast {

// f (P, D) -= lr * (grad_g - g (g . grad_g)) / ||f||, with g = f / ||f|| per row.
template <class T>
void projected_update(T* f, const T* grad_g, int64_t problems, int64_t d, double lr, int threads);

}  // namespace caffast
