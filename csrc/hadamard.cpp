// Norms and channel sums accumulate in double for float inputs too: the result is then at least as
// accurate as torch's float32 autograd, which is what the tests compare with.
#include "hadamard.h"

#include <algorithm>
#include <vector>

#include "parallel.h"
#include "sphere.h"

namespace caffast {

template <class T>
void hadamard_forward(const T* features, const T* filter, int64_t problems, int64_t channels,
                      int64_t cells, T* out, int threads) {
  std::vector<T> g(problems * cells);
  for (int64_t p = 0; p < problems; ++p) {
    const double norm = clamped_norm(filter + p * cells, cells);
    for (int64_t j = 0; j < cells; ++j) g[p * cells + j] = static_cast<T>(filter[p * cells + j] / norm);
  }
  const int64_t rows = problems * channels;
#pragma omp parallel for num_threads(resolve_threads(threads)) if (rows * cells > kParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = features + r * cells;
    const T* gp = g.data() + (r / channels) * cells;
    T* o = out + r * cells;
    for (int64_t j = 0; j < cells; ++j) o[j] = in[j] * gp[j];
  }
}

template <class T>
void hadamard_backward(const T* features, const T* filter, const T* grad_out, int64_t problems,
                       int64_t channels, int64_t cells, T* grad_filter, int threads) {
#pragma omp parallel num_threads(resolve_threads(threads)) if (problems * channels * cells > kParallelWork)
  {
    std::vector<double> grad_g(cells);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < problems; ++p) {
      std::fill(grad_g.begin(), grad_g.end(), 0.0);
      for (int64_t c = 0; c < channels; ++c) {
        const T* a = features + (p * channels + c) * cells;
        const T* go = grad_out + (p * channels + c) * cells;
        for (int64_t j = 0; j < cells; ++j) grad_g[j] += static_cast<double>(go[j]) * static_cast<double>(a[j]);
      }
      T* out = grad_filter + p * cells;
      for_each_sphere_grad(filter + p * cells, grad_g.data(), cells,
                           [out](int64_t j, double value) { out[j] = static_cast<T>(value); });
    }
  }
}

template void hadamard_forward<float>(const float*, const float*, int64_t, int64_t, int64_t, float*, int);
template void hadamard_forward<double>(const double*, const double*, int64_t, int64_t, int64_t, double*, int);
template void hadamard_backward<float>(const float*, const float*, const float*, int64_t, int64_t, int64_t,
                                       float*, int);
template void hadamard_backward<double>(const double*, const double*, const double*, int64_t, int64_t,
                                        int64_t, double*, int);

}  // namespace caffast
