// The constraints that turn a problem's optimized parameters f into its spatial filter g, and the
// chain rule from dloss/dg back to dloss/df.
#pragma once

#include <cstdint>

namespace caffast {

enum class Constraint { L2Norm, Softmax, Gauss };

// The filter's grid: H x W, or D x H x W on clips and volumes (depth 0: the grid has no depth axis).
// Cells are numbered row-major, the width fastest.
struct Grid {
  int64_t height;
  int64_t width;
  int64_t depth = 0;
  int64_t axes() const { return depth > 0 ? 3 : 2; }
  int64_t cells() const { return (depth > 0 ? depth : 1) * height * width; }
};

// D: how many parameters one problem has (the cells, or the Gaussian's mean: one per grid axis).
int64_t parameter_count(Constraint constraint, Grid grid);

// g (HW) from f (D).
void constrain(Constraint constraint, Grid grid, const double* f, double* g);

// grad_f (D) from grad_g (HW); g is what constrain() returned for this f.
void constrain_backward(Constraint constraint, Grid grid, const double* f, const double* g,
                        const double* grad_g, double* grad_f);

}  // namespace caffast
