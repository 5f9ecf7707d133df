// Rows are independent; the sphere rule itself lives in sphere.h, shared with the fused solver.
#include "projected_update.h"

#include "parallel.h"
#include "sphere.h"

namespace caffast {

template <class T>
void projected_update(T* f, const T* grad_g, int64_t problems, int64_t d, double lr, int threads) {
#pragma omp parallel for num_threads(resolve_threads(threads)) if (problems * d > kParallelWork)
  for (int64_t p = 0; p < problems; ++p) {
    T* row = f + p * d;
    for_each_sphere_grad(row, grad_g + p * d, d, [row, lr](int64_t j, double value) {
      row[j] = static_cast<T>(static_cast<double>(row[j]) - lr * value);
    });
  }
}

template void projected_update<float>(float*, const float*, int64_t, int64_t, double, int);
template void projected_update<double>(double*, const double*, int64_t, int64_t, double, int);

}  // namespace caffast
