// l2norm, softmax and gauss, written per problem on plain double buffers for the fused solver.
// The Gaussian is evaluated as a softmax of its log-density: the same g as exp(...) / sum(exp(...))
// up to rounding, but it stays finite when the mean wanders far off the grid and every exp underflows.
#include "constraints.h"

#include <algorithm>
#include <cmath>

#include "sphere.h"
#include "vector_ops.h"

namespace caffast {
namespace {

void softmax_inplace(double* z, int64_t n) {
  const double top = *std::max_element(z, z + n);
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    z[j] = std::exp(z[j] - top);
    sum += z[j];
  }
  for (int64_t j = 0; j < n; ++j) z[j] /= sum;
}

// Grid coordinates centred on the grid: x = col - (W - 1) / 2, y = row - (H - 1) / 2, and on a
// D x H x W grid z = slice - (D - 1) / 2 (0 on an H x W grid).
double centred_x(Grid grid, int64_t cell) { return static_cast<double>(cell % grid.width) - (grid.width - 1) / 2.0; }
double centred_y(Grid grid, int64_t cell) {
  return static_cast<double>(cell / grid.width % grid.height) - (grid.height - 1) / 2.0;
}
double centred_z(Grid grid, int64_t cell) {
  if (grid.depth == 0) return 0.0;
  return static_cast<double>(cell / (grid.width * grid.height)) - (grid.depth - 1) / 2.0;
}

}  // namespace

int64_t parameter_count(Constraint constraint, Grid grid) {
  return constraint == Constraint::Gauss ? grid.axes() : grid.cells();
}

void constrain(Constraint constraint, Grid grid, const double* f, double* g) {
  const int64_t n = grid.cells();
  switch (constraint) {
    case Constraint::L2Norm: {
      const double norm = clamped_norm(f, n);
      for (int64_t j = 0; j < n; ++j) g[j] = f[j] / norm;
      return;
    }
    case Constraint::Softmax:
      std::copy(f, f + n, g);
      softmax_inplace(g, n);
      return;
    case Constraint::Gauss:
      for (int64_t j = 0; j < n; ++j) {
        const double dx = centred_x(grid, j) - f[0];
        const double dy = centred_y(grid, j) - f[1];
        const double dz = grid.depth > 0 ? centred_z(grid, j) - f[2] : 0.0;
        g[j] = -(dx * dx + dy * dy + dz * dz) / 2.0;
      }
      softmax_inplace(g, n);
      return;
  }
}

void constrain_backward(Constraint constraint, Grid grid, const double* f, const double* g,
                        const double* grad_g, double* grad_f) {
  const int64_t n = grid.cells();
  switch (constraint) {
    case Constraint::L2Norm:
      for_each_sphere_grad(f, grad_g, n, [grad_f](int64_t j, double value) { grad_f[j] = value; });
      return;
    case Constraint::Softmax: {
      const double mean = dot(g, grad_g, n);
      for (int64_t j = 0; j < n; ++j) grad_f[j] = g[j] * (grad_g[j] - mean);
      return;
    }
    case Constraint::Gauss: {
      // grad_mu = sum_cells grad_g * g * (coordinate - its g-weighted mean).
      double x_bar = 0.0, y_bar = 0.0, z_bar = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        x_bar += g[j] * centred_x(grid, j);
        y_bar += g[j] * centred_y(grid, j);
        z_bar += g[j] * centred_z(grid, j);
      }
      double grad_x = 0.0, grad_y = 0.0, grad_z = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        const double weight = grad_g[j] * g[j];
        grad_x += weight * (centred_x(grid, j) - x_bar);
        grad_y += weight * (centred_y(grid, j) - y_bar);
        grad_z += weight * (centred_z(grid, j) - z_bar);
      }
      grad_f[0] = grad_x;
      grad_f[1] = grad_y;
      if (grid.depth > 0) grad_f[2] = grad_z;
      return;
    }
  }
}

}  // namespace caffast
