// Lets a long kernel call stop early, e.g. on Ctrl-C. The kernels stay free of Python: the caller
// supplies `poll` (module.cpp asks Python whether a signal handler raised), which only the calling
// thread runs, at most every kPollInterval; once it answers true, every thread leaves its work.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>

namespace caffast {

class Interrupt {
 public:
  static constexpr std::chrono::milliseconds kPollInterval{5};

  explicit Interrupt(std::function<bool()> poll = {}) : poll_(std::move(poll)) {}

  // From the calling thread only: runs `poll` when kPollInterval has passed since the last time.
  void check() {
    const auto now = std::chrono::steady_clock::now();
    if (!poll_ || now - last_ < kPollInterval) return;
    last_ = now;
    if (poll_()) stopped_.store(true, std::memory_order_relaxed);
  }

  // From any thread.
  bool stopped() const { return stopped_.load(std::memory_order_relaxed); }

 private:
  std::function<bool()> poll_;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
  std::atomic<bool> stopped_{false};
};

}  // namespace caffast
