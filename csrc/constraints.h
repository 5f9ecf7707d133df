// The constraints that turn a problem's optimized parameters f into its spatial filter g, and the
// chain rule from dloss/dg back to dloss/df.
#pragma once

#include <cstdint>

namespace caffast {

enum class Constraint { L2Norm, Softmax, Gauss };

struct Grid {
  int64_t height;
  int64_t width;
  int64_t cells() const { return height * width; }
};

// D: how many parameters one problem has (HW, or 2 for the Gaussian's mean).
int64_t parameter_count(Constraint constraint, Grid grid);

// g (HW) from f (D).
void constrain(Constraint constraint, Grid grid, const double* f, double* g);

// grad_f (D) from grad_g (HW); g is what constrain() returned for this f.
void constrain_backward(Constraint constraint, Grid grid, const double* f, const double* g,
                        const double* grad_g, double* grad_f);

}  // namespace caffast
