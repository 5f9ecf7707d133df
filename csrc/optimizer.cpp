// Written to follow torch's single-tensor Adam operation by operation (lerp for the first moment,
// bias corrections folded into the step size and the denominator), so results agree to rounding.
#include "optimizer.h"

#include <cmath>

namespace caffast {
namespace {

constexpr double kMinLr = 1e-5;
constexpr double kBeta1 = 0.9;
constexpr double kBeta2 = 0.999;
constexpr double kAdamEps = 1e-8;

}  // namespace

double scheduled_lr(double lr, int64_t t, int64_t max_iter) {
  return (lr - kMinLr) * (1.0 - static_cast<double>(t) / static_cast<double>(max_iter)) + kMinLr;
}

void optimizer_step(Optimizer optimizer, int64_t t, double lr_t, int64_t d, const double* grad,
                    double* f, double* m, double* v) {
  if (optimizer == Optimizer::Sgd) {
    for (int64_t j = 0; j < d; ++j) f[j] -= lr_t * grad[j];
    return;
  }
  const double step = static_cast<double>(t + 1);
  const double step_size = lr_t / (1.0 - std::pow(kBeta1, step));
  const double correction2_sqrt = std::sqrt(1.0 - std::pow(kBeta2, step));
  for (int64_t j = 0; j < d; ++j) {
    m[j] += (1.0 - kBeta1) * (grad[j] - m[j]);
    v[j] = v[j] * kBeta2 + (1.0 - kBeta2) * grad[j] * grad[j];
    f[j] -= step_size * (m[j] / (std::sqrt(v[j]) / correction2_sqrt + kAdamEps));
  }
}

}  // namespace caffast
