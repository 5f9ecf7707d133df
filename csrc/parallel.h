// OpenMP is optional at build time (setup.py probes for it); this header keeps the sources free of
// #ifdefs by resolving a requested thread count to what the build can actually use.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace caffast {

inline bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

// Below this many elements, starting threads costs more than it saves.
constexpr int64_t kParallelWork = 1 << 15;

// requested <= 0 means the OpenMP default (OMP_NUM_THREADS or the core count).
inline int resolve_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// The OpenMP thread number inside a parallel region (0: the thread that started it).
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace caffast
