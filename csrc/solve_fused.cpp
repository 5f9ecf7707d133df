// The reference loop, run problem by problem: each OpenMP thread takes whole problems (dynamic
// schedule, since problems stop at different iterations) and keeps its own scratch buffers, so the
// result of a problem never depends on the batch or the thread count.
#include "solve_fused.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <thread>
#include <vector>

#include "parallel.h"

namespace caffast {
namespace {

constexpr double kInitialPreviousLoss = 32767.0;  // the reference's first "previous loss"
// Iterations between two looks at the interrupt (a look costs a clock read, an iteration O(HW^2)).
constexpr int64_t kInterruptEvery = 16;

struct Workspace {
  std::vector<double> g, grad_g, grad_f, m, v, scratch;
  Workspace(int64_t cells, int64_t d, int64_t classes)
      : g(cells), grad_g(cells), grad_f(d), m(d), v(d), scratch(std::max(4 * cells, classes)) {}
};

void solve_one(const FusedSettings& s, const FusedBatch& batch, int64_t p, Workspace& w, Interrupt& interrupt,
               bool caller) {
  const int64_t cells = s.grid.cells();
  const int64_t d = parameter_count(s.constraint, s.grid);
  const int64_t gram_size = s.signs * s.signs * cells * cells;
  const FusedObjective objective{
      s.mode,
      s.signs,
      cells,
      s.classes,
      s.mode == Mode::Oblivious ? batch.gram + batch.image[p] * gram_size : nullptr,
      batch.linear + p * s.signs * cells,
      batch.constant[p],
      s.mode == Mode::LogSoftmax ? batch.products + batch.image[p] * s.signs * s.classes * cells : nullptr,
      batch.bias,
      s.mode == Mode::LogSoftmax ? batch.targets[p] : 0,
  };
  double* f = batch.params + p * d;
  std::fill(w.m.begin(), w.m.end(), 0.0);
  std::fill(w.v.begin(), w.v.end(), 0.0);

  double previous = kInitialPreviousLoss;
  double last_loss = std::numeric_limits<double>::quiet_NaN();
  int64_t iterations = 0;
  for (int64_t t = 0; t < s.max_iter; ++t) {
    if (t % kInterruptEvery == 0) {
      if (caller) interrupt.check();
      if (interrupt.stopped()) return;
    }
    constrain(s.constraint, s.grid, f, w.g.data());
    const double loss = objective.evaluate(w.g.data(), w.grad_g.data(), w.scratch.data());
    constrain_backward(s.constraint, s.grid, f, w.g.data(), w.grad_g.data(), w.grad_f.data());
    optimizer_step(s.optimizer, t, scheduled_lr(s.lr, t, s.max_iter), d, w.grad_f.data(), f,
                   w.m.data(), w.v.data());
    iterations = t + 1;
    last_loss = loss;
    if (t % s.check_every == 0) {
      if (std::fabs(loss - previous) < s.min_error) break;
      previous = loss;
    }
  }
  batch.iterations[p] = iterations;
  batch.loss[p] = last_loss;
}

}  // namespace

void solve_fused(const FusedSettings& settings, const FusedBatch& batch, Interrupt& interrupt) {
  const int64_t cells = settings.grid.cells();
  const int64_t d = parameter_count(settings.constraint, settings.grid);
  // each thread takes the next problem (a dynamic schedule) without a barrier at the end, so the
  // calling thread can keep checking the interrupt while the others end their last problems
  std::atomic<int64_t> next{0}, finished{0};
#pragma omp parallel num_threads(resolve_threads(settings.threads)) if (batch.problems > 1)
  {
    const bool caller = thread_index() == 0;
    Workspace workspace(cells, d, settings.classes);
    for (int64_t p = next++; p < batch.problems && !interrupt.stopped(); p = next++) {
      solve_one(settings, batch, p, workspace, interrupt, caller);
      ++finished;
    }
    while (caller && finished < batch.problems && !interrupt.stopped()) {
      interrupt.check();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
}

}  // namespace caffast
