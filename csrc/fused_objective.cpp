// Oblivious: FT - NT = [M+ | M-] z / HW with z = [g+ - 1, g-] (g+ and g- the filter on its
// non-negative and negative cells; z = g - 1 for a plain head), so loss = z.Gz / (K HW^2) and
// dloss/dz = 2 Gz / (K HW^2); dloss/dg_j is the z-part that cell j lives in.  Evaluating z.Gz
// directly, rather than expanded into g.Gg - 2 g.l + c0, leaves no large constant to cancel.
// Specific: loss = g.l / HW + c0 with l_j = L[s_j, j] (linear in g, so its gradient is l / HW).
// Log-softmax: FT_k = sum_j M[s_j, k, j] g_j / HW + b_k and loss = logsumexp(FT) - FT_t, so
// dloss/dg_j = sum_k (softmax(FT)_k - [k = t]) M[s_j, k, j] / HW: O(K HW) per evaluation.
// The sign pattern s picks, per cell, the part a ReLU head sees; with S = 1 it is always 0.
#include "fused_objective.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "vector_ops.h"

namespace caffast {
namespace {

int64_t sign_index(int64_t signs, double value) { return (signs == 2 && !(value >= 0.0)) ? 1 : 0; }

}  // namespace

double FusedObjective::evaluate(const double* g, double* grad_g, double* scratch) const {
  const int64_t n = cells;
  const double hw = static_cast<double>(n);

  if (mode == Mode::LogSoftmax) {
    double* logits = scratch;
    double largest = -std::numeric_limits<double>::infinity();
    for (int64_t k = 0; k < classes; ++k) {
      double value = 0.0;
      for (int64_t j = 0; j < n; ++j) value += products[(sign_index(signs, g[j]) * classes + k) * n + j] * g[j];
      logits[k] = value / hw + bias[k];
      largest = std::max(largest, logits[k]);
    }
    double total = 0.0;
    for (int64_t k = 0; k < classes; ++k) total += std::exp(logits[k] - largest);
    const double log_total = largest + std::log(total);
    const double loss = log_total - logits[target];
    for (int64_t k = 0; k < classes; ++k) logits[k] = std::exp(logits[k] - log_total) - (k == target ? 1.0 : 0.0);
    for (int64_t j = 0; j < n; ++j) {
      const double* column = products + sign_index(signs, g[j]) * classes * n + j;
      double value = 0.0;
      for (int64_t k = 0; k < classes; ++k) value += logits[k] * column[k * n];
      grad_g[j] = value / hw;
    }
    return loss;
  }

  if (mode == Mode::Specific) {
    double loss = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      grad_g[j] = linear[sign_index(signs, g[j]) * n + j] / hw;
      loss += g[j] * grad_g[j];
    }
    return loss + constant;
  }

  double* z[2] = {scratch, scratch + n};
  double* q[2] = {scratch + 2 * n, scratch + 3 * n};
  for (int64_t j = 0; j < n; ++j) {
    const bool negative = sign_index(signs, g[j]) == 1;
    z[0][j] = (negative ? 0.0 : g[j]) - 1.0;
    if (signs == 2) z[1][j] = negative ? g[j] : 0.0;
  }
  const int64_t block = n * n;
  double quadratic = 0.0;
  for (int64_t a = 0; a < signs; ++a) {
    for (int64_t i = 0; i < n; ++i) {
      double value = 0.0;
      for (int64_t b = 0; b < signs; ++b) value += dot(gram + (a * signs + b) * block + i * n, z[b], n);
      q[a][i] = value;
    }
    quadratic += dot(z[a], q[a], n);
  }
  const double scale = static_cast<double>(classes) * hw * hw;
  for (int64_t j = 0; j < n; ++j) grad_g[j] = 2.0 * q[sign_index(signs, g[j])][j] / scale;
  return quadratic / scale;
}

}  // namespace caffast
