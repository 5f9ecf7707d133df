// The loss of one fused-head problem as a function of its filter g, and dloss/dg, from the
// precomputed Grams and linear terms (docs/design.md, 'The fused head'): O(HW^2) per evaluation, whatever the
// channel and class counts of the head are.
#pragma once

#include <cstdint>

namespace caffast {

enum class Mode { Oblivious, Specific, LogSoftmax };

struct FusedObjective {
  Mode mode;
  int64_t signs;       // S: 1 for a plain head, 2 for a ReLU head (separate parts for g_j >= 0 and g_j < 0)
  int64_t cells;       // HW
  int64_t classes;     // K, the length of the head's output
  const double* gram;  // (S, S, HW, HW) of the problem's image; unused when specific
  const double* linear;  // (S, HW); read when specific
  double constant;
  const double* products;  // (S, K, HW) of the problem's image, M_s; read when log-softmax
  const double* bias;      // (K,); read when log-softmax
  int64_t target;          // the class whose log-probability is raised; read when log-softmax

  // Returns the loss at g and writes dloss/dg into grad_g. scratch holds max(4 HW, K) doubles.
  double evaluate(const double* g, double* grad_g, double* scratch) const;
};

}  // namespace caffast
