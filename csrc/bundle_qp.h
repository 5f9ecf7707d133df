// The dual quadratic program of solver="fast"'s bundle step (caffast/core/fast.py, whose NumPy
// bundle_qp is the twin this is tested against): per problem, over the simplex of its valid cuts,
//     min_lambda  t/2 lambda^T G lambda + alpha^T lambda,
// by a fixed number of FISTA iterations with a Euclidean simplex projection.  It is tiny (K <= 20
// cuts) and runs once per tail evaluation, so its cost is all per-operation overhead in Python.
#pragma once

#include <cstdint>

namespace caffast {

// gram (A, K, K), alpha (A, K) (ignored where !valid), t (A,), valid (A, K) -> lambda (A, K).
void bundle_qp(const double* gram, const double* alpha, const double* t, const bool* valid, int64_t problems,
               int64_t cuts, int64_t iterations, double* lambda);

}  // namespace caffast
