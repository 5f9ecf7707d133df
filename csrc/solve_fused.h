// The whole fused-head optimization for a batch of independent problems in one call.
#pragma once

#include <cstdint>

#include "constraints.h"
#include "fused_objective.h"
#include "interrupt.h"
#include "optimizer.h"

namespace caffast {

struct FusedSettings {
  Mode mode;
  Constraint constraint;
  Optimizer optimizer;
  Grid grid;
  int64_t signs;    // S
  int64_t classes;  // K
  int64_t max_iter;
  double lr;
  double min_error;
  int64_t check_every;
  int threads;  // <= 0: OpenMP default
};

// Buffers of a batch, all C-contiguous; shapes validated by the caller.
struct FusedBatch {
  int64_t problems;         // P
  const double* gram;       // (I, S, S, HW, HW)
  const double* linear;     // (P, S, HW)
  const double* constant;   // (P,)
  const int64_t* image;     // (P,) into gram and products
  const double* products;   // (I, S, K, HW): log-softmax only
  const double* bias;       // (K,): log-softmax only
  const int64_t* targets;   // (P,): log-softmax only
  double* params;           // (P, D), updated in place
  int64_t* iterations;      // (P,) out
  double* loss;             // (P,) out: the loss of the last iteration run (NaN if none ran)
};

// Stops early, leaving the outputs unfinished, once `interrupt` is stopped (see interrupt.h): the
// calling thread checks it every few milliseconds, also while the other threads end their problems.
void solve_fused(const FusedSettings& settings, const FusedBatch& batch, Interrupt& interrupt);

}  // namespace caffast
