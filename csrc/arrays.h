// Checks on the numpy buffers that cross from Python. Nothing is ever copied or converted: a buffer
// with the wrong dtype, layout or shape is refused with an error that names the argument, because a
// silent copy of an output would lose the results and a silent cast would hide a caller's bug.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

namespace caffast {
namespace py = pybind11;

inline void require(bool condition, const std::string& message) {
  if (!condition) throw py::value_error(message);
}

template <class T>
const char* dtype_name() {
  if (std::is_same<T, double>::value) return "float64";
  if (std::is_same<T, float>::value) return "float32";
  return "int64";
}

// obj as a C-contiguous array of T with ndim dimensions (writable when asked), else TypeError.
template <class T>
py::array_t<T, py::array::c_style> as_array(const py::handle& obj, const char* name, py::ssize_t ndim,
                                            bool writable = false) {
  using Array = py::array_t<T, py::array::c_style>;
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + " must be a numpy array");
  const auto any = py::reinterpret_borrow<py::array>(obj);
  if (!py::isinstance<Array>(obj)) {
    const bool right_type = py::isinstance<py::array_t<T>>(obj);
    throw py::type_error(std::string(name) + (right_type ? " must be C-contiguous"
                                                         : std::string(" must have dtype ") + dtype_name<T>() +
                                                               ", got " + std::string(py::str(any.dtype()))));
  }
  require(any.ndim() == ndim, std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got " +
                                  std::to_string(any.ndim()));
  require(!writable || any.writeable(), std::string(name) + " must be writable");
  return py::reinterpret_borrow<Array>(obj);
}

inline std::string shape_text(const py::array& a) {
  std::string text = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) text += (d ? ", " : "") + std::to_string(a.shape(d));
  return text + (a.ndim() == 1 ? ",)" : ")");
}

// expected: one size per dimension, -1 for any size.
inline void require_shape(const py::array& a, const char* name, std::initializer_list<int64_t> expected) {
  bool ok = static_cast<size_t>(a.ndim()) == expected.size();
  py::ssize_t d = 0;
  std::string wanted = "(";
  for (int64_t size : expected) {
    ok = ok && (size < 0 || a.shape(d) == size);
    wanted += (d ? ", " : "") + (size < 0 ? std::string("*") : std::to_string(size));
    ++d;
  }
  wanted += expected.size() == 1 ? ",)" : ")";
  require(ok, std::string(name) + " must have shape " + wanted + ", got " + shape_text(a));
}

}  // namespace caffast
