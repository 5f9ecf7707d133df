// The unit-sphere parameterization g = f / max(||f||, eps) (torch.nn.functional.normalize) and its
// chain rule back to f. Kept in one place because the fused solver's l2norm constraint and the
// Hadamard filter must round and clamp exactly alike.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace caffast {

constexpr double kNormEps = 1e-12;  // F.normalize's default eps

// ||f|| clamped from below at kNormEps, accumulated in double whatever T is.
template <class T>
double clamped_norm(const T* f, int64_t d) {
  double sum = 0.0;
  for (int64_t j = 0; j < d; ++j) sum += static_cast<double>(f[j]) * static_cast<double>(f[j]);
  return std::max(std::sqrt(sum), kNormEps);
}

// Calls write(j, grad_f_j) for every j, with grad_f = (grad_g - g (g . grad_g)) / n, the gradient
// projected on the sphere's tangent plane. When the clamp is active the norm does not depend on f,
// so the radial term vanishes and grad_f = grad_g / eps, as autograd through the clamp gives.
// The norm and the radial term are computed before the first write, so write may update f in place.
template <class T, class U, class Write>
void for_each_sphere_grad(const T* f, const U* grad_g, int64_t d, Write&& write) {
  const double norm = clamped_norm(f, d);
  double radial = 0.0;
  if (norm > kNormEps) {
    for (int64_t j = 0; j < d; ++j) radial += (static_cast<double>(f[j]) / norm) * static_cast<double>(grad_g[j]);
  }
  for (int64_t j = 0; j < d; ++j) {
    const double g = static_cast<double>(f[j]) / norm;
    write(j, (static_cast<double>(grad_g[j]) - g * radial) / norm);
  }
}

}  // namespace caffast
