// Each problem alone, in the operation order of the NumPy twin, so that both agree to rounding
// (NumPy's trace and einsum may sum in another order: differences of about 1e-15).
#include "bundle_qp.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

namespace caffast {
namespace {

// The Euclidean projection of values (K) onto the simplex over the valid entries; others get 0.
void project_simplex(const double* values, const bool* valid, int64_t k, std::vector<double>& ordered,
                     double* out) {
  ordered.clear();
  for (int64_t i = 0; i < k; ++i)
    if (valid[i]) ordered.push_back(values[i]);
  std::sort(ordered.begin(), ordered.end(), std::greater<double>());
  double cumulative = 0.0, theta = 0.0;
  for (size_t i = 0; i < ordered.size(); ++i) {
    cumulative += ordered[i];
    const double shifted = cumulative - 1.0;
    if (ordered[i] - shifted / static_cast<double>(i + 1) > 0) theta = shifted / static_cast<double>(i + 1);
  }
  for (int64_t i = 0; i < k; ++i) out[i] = valid[i] ? std::max(values[i] - theta, 0.0) : 0.0;
}

void solve_one(const double* gram, const double* alpha, double t, const bool* valid, int64_t k,
               int64_t iterations, double* lambda) {
  std::vector<double> a(k), previous(k, 0.0), z(k), grad(k), trial(k), ordered;
  ordered.reserve(k);
  double trace = 0.0;
  int64_t start = 0;
  double least = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < k; ++i) {
    a[i] = valid[i] ? alpha[i] : 0.0;
    trace += gram[i * k + i];
    if (valid[i] && alpha[i] < least) least = alpha[i], start = i;
  }
  const double lipschitz = std::max(t * trace, 1e-300);
  previous[start] = 1.0;
  z = previous;
  double momentum = 1.0;
  for (int64_t step = 0; step < iterations; ++step) {
    for (int64_t i = 0; i < k; ++i) {
      double dot = 0.0;
      for (int64_t j = 0; j < k; ++j) dot += gram[i * k + j] * z[j];
      grad[i] = t * dot + a[i];
      trial[i] = z[i] - grad[i] / lipschitz;
    }
    project_simplex(trial.data(), valid, k, ordered, lambda);
    const double following = (1.0 + std::sqrt(1.0 + 4.0 * momentum * momentum)) / 2.0;
    const double weight = (momentum - 1.0) / following;
    for (int64_t i = 0; i < k; ++i) z[i] = lambda[i] + weight * (lambda[i] - previous[i]);
    std::copy(lambda, lambda + k, previous.begin());
    momentum = following;
  }
  if (iterations == 0) std::copy(previous.begin(), previous.end(), lambda);
}

}  // namespace

void bundle_qp(const double* gram, const double* alpha, const double* t, const bool* valid, int64_t problems,
               int64_t cuts, int64_t iterations, double* lambda) {
  for (int64_t p = 0; p < problems; ++p)
    solve_one(gram + p * cuts * cuts, alpha + p * cuts, t[p], valid + p * cuts, cuts, iterations, lambda + p * cuts);
}

}  // namespace caffast
