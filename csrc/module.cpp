// The Python face of caffast._C: parses the option strings, validates every buffer (arrays.h) and
// releases the GIL around the kernels. The kernels themselves know nothing about Python; a long one
// (solve_fused) polls python_signals, so Ctrl-C (or any signal handler that raises) stops it within
// milliseconds and its exception reaches the caller.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <utility>

#include "arrays.h"
#include "bundle_qp.h"
#include "hadamard.h"
#include "interrupt.h"
#include "parallel.h"
#include "solve_fused.h"

namespace caffast {
namespace {

// Runs the Python signal handlers of signals that arrived meanwhile (called with the GIL released,
// from the thread that released it); true when one raised, its exception then set in Python.
bool python_signals() {
  py::gil_scoped_acquire gil;
  return PyErr_CheckSignals() != 0;
}

template <class Enum>
Enum parse_choice(const std::string& kind, const std::string& value,
                  std::initializer_list<std::pair<const char*, Enum>> choices) {
  std::string names;
  for (const auto& choice : choices) {
    if (value == choice.first) return choice.second;
    names += (names.empty() ? "'" : ", '") + std::string(choice.first) + "'";
  }
  throw py::value_error("unknown " + kind + " '" + value + "'; choose one of " + names);
}

py::tuple solve_fused_py(const py::handle& gram_obj, const py::handle& linear_obj,
                         const py::handle& constant_obj, const py::handle& image_obj,
                         const py::handle& products_obj, const py::handle& bias_obj,
                         const py::handle& targets_obj, const py::handle& params_obj, const std::string& mode,
                         const std::string& constraint, const std::string& optimizer, int64_t height,
                         int64_t width, int64_t depth, int64_t classes, int64_t max_iter, double lr,
                         double min_error, int64_t check_every, int threads) {
  FusedSettings s{};
  s.mode = parse_choice<Mode>("mode", mode, {{"oblivious", Mode::Oblivious}, {"specific", Mode::Specific},
                                             {"log_softmax", Mode::LogSoftmax}});
  s.constraint = parse_choice<Constraint>(
      "constraint", constraint,
      {{"l2norm", Constraint::L2Norm}, {"softmax", Constraint::Softmax}, {"gauss", Constraint::Gauss}});
  s.optimizer = parse_choice<Optimizer>("optimizer", optimizer, {{"sgd", Optimizer::Sgd}, {"adam", Optimizer::Adam}});
  require(height >= 1 && width >= 1 && depth >= 0,
          "the grid must have at least one cell in each direction (depth 0: a grid without depth)");
  require(classes >= 1, "classes must be at least 1");
  require(max_iter >= 0, "max_iter must be non-negative");
  require(check_every >= 1, "check_every must be at least 1");
  s.grid = Grid{height, width, depth};
  s.classes = classes;
  s.max_iter = max_iter;
  s.lr = lr;
  s.min_error = min_error;
  s.check_every = check_every;
  s.threads = threads;

  const int64_t cells = s.grid.cells();
  auto linear = as_array<double>(linear_obj, "linear", 3);
  const int64_t problems = linear.shape(0);
  s.signs = linear.shape(1);
  require(s.signs == 1 || s.signs == 2, "linear must have shape (P, S, HW) with S = 1 (plain head) or 2 (ReLU head)");
  require_shape(linear, "linear", {problems, s.signs, cells});
  auto gram = as_array<double>(gram_obj, "gram", 5);
  require_shape(gram, "gram", {-1, s.signs, s.signs, cells, cells});
  auto constant = as_array<double>(constant_obj, "constant", 1);
  require_shape(constant, "constant", {problems});
  auto image = as_array<int64_t>(image_obj, "image", 1);
  require_shape(image, "image", {problems});
  auto products = as_array<double>(products_obj, "products", 4);
  auto bias = as_array<double>(bias_obj, "bias", 1);
  auto targets = as_array<int64_t>(targets_obj, "targets", 1);
  if (s.mode == Mode::LogSoftmax) {
    require_shape(products, "products", {-1, s.signs, classes, cells});
    require_shape(bias, "bias", {classes});
    require_shape(targets, "targets", {problems});
    for (int64_t p = 0; p < problems; ++p) {
      require(image.data()[p] >= 0 && image.data()[p] < products.shape(0),
              "image[" + std::to_string(p) + "] is not an index into products' images");
      require(targets.data()[p] >= 0 && targets.data()[p] < classes,
              "targets[" + std::to_string(p) + "] = " + std::to_string(targets.data()[p]) + " is not a class");
    }
  }
  auto params = as_array<double>(params_obj, "params", 2, /*writable=*/true);
  require_shape(params, "params", {problems, parameter_count(s.constraint, s.grid)});
  if (s.mode == Mode::Oblivious) {
    const int64_t images = gram.shape(0);
    for (int64_t p = 0; p < problems; ++p) {
      require(image.data()[p] >= 0 && image.data()[p] < images,
              "image[" + std::to_string(p) + "] = " + std::to_string(image.data()[p]) +
                  " is not an index into gram's " + std::to_string(images) + " images");
    }
  }

  py::array_t<int64_t> iterations(problems);
  py::array_t<double> loss(problems);
  const FusedBatch batch{problems,       gram.data(),         linear.data(),    constant.data(), image.data(),
                         products.data(), bias.data(),        targets.data(),
                         params.mutable_data(), iterations.mutable_data(), loss.mutable_data()};
  Interrupt interrupt(python_signals);
  {
    py::gil_scoped_release release;
    solve_fused(s, batch, interrupt);
  }
  if (interrupt.stopped()) throw py::error_already_set();
  return py::make_tuple(iterations, loss);
}

// Calls body(T{}) with T the floating type of a (float32 or float64), else TypeError.
template <class Body>
auto dispatch_floating(const py::handle& a, const char* name, Body&& body) {
  if (py::isinstance<py::array_t<float>>(a)) return body(float{});
  if (py::isinstance<py::array_t<double>>(a)) return body(double{});
  throw py::type_error(std::string(name) + " must be a float32 or float64 numpy array");
}

// The feature maps (P, C, H, W) and one filter (P, H, W) per problem, checked against each other.
template <class T>
std::pair<py::array_t<T>, py::array_t<T>> hadamard_inputs(const py::handle& features_obj,
                                                           const py::handle& filter_obj) {
  auto features = as_array<T>(features_obj, "features", 4);
  auto filter = as_array<T>(filter_obj, "filter", 3);
  require_shape(filter, "filter", {features.shape(0), features.shape(2), features.shape(3)});
  return {features, filter};
}

py::array hadamard_forward_py(const py::handle& features_obj, const py::handle& filter_obj, int threads) {
  return dispatch_floating(features_obj, "features", [&](auto zero) -> py::array {
    using T = decltype(zero);
    auto [features, filter] = hadamard_inputs<T>(features_obj, filter_obj);
    const int64_t problems = features.shape(0), channels = features.shape(1);
    const int64_t height = features.shape(2), width = features.shape(3);
    py::array_t<T> out({problems, channels, height, width});
    const T* in = features.data();
    const T* f = filter.data();
    T* o = out.mutable_data();
    {
      py::gil_scoped_release release;
      hadamard_forward<T>(in, f, problems, channels, height * width, o, threads);
    }
    return out;
  });
}

py::array hadamard_backward_py(const py::handle& features_obj, const py::handle& filter_obj,
                               const py::handle& grad_out_obj, int threads) {
  return dispatch_floating(features_obj, "features", [&](auto zero) -> py::array {
    using T = decltype(zero);
    auto [features, filter] = hadamard_inputs<T>(features_obj, filter_obj);
    const int64_t problems = features.shape(0), channels = features.shape(1);
    const int64_t height = features.shape(2), width = features.shape(3);
    auto grad_out = as_array<T>(grad_out_obj, "grad_out", 4);
    require_shape(grad_out, "grad_out", {problems, channels, height, width});
    py::array_t<T> grad_filter({problems, height, width});
    const T* a = features.data();
    const T* f = filter.data();
    const T* go = grad_out.data();
    T* out = grad_filter.mutable_data();
    {
      py::gil_scoped_release release;
      hadamard_backward<T>(a, f, go, problems, channels, height * width, out, threads);
    }
    return grad_filter;
  });
}

py::array bundle_qp_py(const py::handle& gram_obj, const py::handle& alpha_obj, const py::handle& t_obj,
                       const py::handle& valid_obj, int64_t iterations) {
  auto gram = as_array<double>(gram_obj, "gram", 3);
  const int64_t problems = gram.shape(0), cuts = gram.shape(1);
  require_shape(gram, "gram", {problems, cuts, cuts});
  auto alpha = as_array<double>(alpha_obj, "alpha", 2);
  require_shape(alpha, "alpha", {problems, cuts});
  auto t = as_array<double>(t_obj, "t", 1);
  require_shape(t, "t", {problems});
  if (!py::isinstance<py::array_t<bool, py::array::c_style>>(valid_obj))
    throw py::type_error("valid must be a C-contiguous numpy array of dtype bool");
  auto valid = py::reinterpret_borrow<py::array_t<bool, py::array::c_style>>(valid_obj);
  require(valid.ndim() == 2, "valid must have 2 dimensions");
  require_shape(valid, "valid", {problems, cuts});
  require(iterations >= 0, "iterations must be non-negative");
  require(cuts > 0 || problems == 0, "each problem needs at least one cut (gram has K = 0)");
  py::array_t<double> lambda({problems, cuts});
  const double* g = gram.data();
  const double* a = alpha.data();
  const double* step = t.data();
  const bool* ok = valid.data();
  double* out = lambda.mutable_data();
  {
    py::gil_scoped_release release;
    bundle_qp(g, a, step, ok, problems, cuts, iterations, out);
  }
  return lambda;
}

}  // namespace
}  // namespace caffast

PYBIND11_MODULE(_C, m) {
  using namespace caffast;
  namespace py = pybind11;
  m.doc() = "caffast's C++ CPU kernels: the fused-head L2-CAF solver, the Hadamard filter and the bundle QP of solver=\"fast\".";
  m.def("solve_fused", &solve_fused_py, py::arg("gram"), py::arg("linear"), py::arg("constant"), py::arg("image"),
        py::arg("products"), py::arg("bias"), py::arg("targets"), py::arg("params"), py::kw_only(), py::arg("mode"), py::arg("constraint"), py::arg("optimizer"),
        py::arg("height"), py::arg("width"), py::arg("depth") = 0, py::arg("classes"), py::arg("max_iter"), py::arg("lr"),
        py::arg("min_error"), py::arg("check_every"), py::arg("threads") = 0,
        "Optimize P fused-head problems; params (P, D) is updated in place. Returns (iterations, loss).");
  m.def("hadamard_forward", &hadamard_forward_py, py::arg("features"), py::arg("filter"), py::kw_only(),
        py::arg("threads") = 0, "features (P, C, H, W) * filter (P, H, W) / ||filter||.");
  m.def("hadamard_backward", &hadamard_backward_py, py::arg("features"), py::arg("filter"), py::arg("grad_out"),
        py::kw_only(), py::arg("threads") = 0, "The gradient of hadamard_forward with respect to filter.");
  m.def("bundle_qp", &bundle_qp_py, py::arg("gram"), py::arg("alpha"), py::arg("t"), py::arg("valid"),
        py::arg("iterations"), "solver='fast''s bundle QP: FISTA over the simplex of each problem's valid cuts.");
  m.def("openmp", &built_with_openmp, "Whether the module was built with OpenMP.");
}
