// The reference's learning-rate schedule and the two update rules (SGD and torch.optim.Adam with its
// defaults), applied to one problem's parameter vector.
#pragma once

#include <cstdint>

namespace caffast {

enum class Optimizer { Sgd, Adam };

// Polynomial decay, power 1, to 1e-5: the learning rate of iteration t (0-based).
double scheduled_lr(double lr, int64_t t, int64_t max_iter);

// One update of f (d values) at iteration t; m and v are Adam's moment buffers (zeros before the
// first step, ignored by SGD).
void optimizer_step(Optimizer optimizer, int64_t t, double lr_t, int64_t d, const double* grad,
                    double* f, double* m, double* v);

}  // namespace caffast
