// The Python module tdiff._C. Importing it loads this shared library, whose static TORCH_LIBRARY_FRAGMENT /
// TORCH_LIBRARY_IMPL blocks (one per op file in csrc/) register the tdiff::*_cpu kernels with the dispatcher.
// It also binds the forward ops' entry points directly (csrc/direct.h) for the public functions' eager no-grad
// fast path: the same functions, validation included, without the dispatcher's per-call cost from Python.
#include <torch/csrc/utils/pybind.h>

#include <pybind11/stl.h>

#include <string>

#include "direct.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "tdiff C++ CPU kernels";
  // the ops raise c10::ValueError / TypeError for bad input: the same Python exceptions as through torch.ops
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  using tensors = std::vector<at::Tensor>;
  using maybe = std::optional<at::Tensor>;
  auto release = py::call_guard<py::gil_scoped_release>();
  m.def("multistep_update_cpu",
        [](const at::Tensor& x, const tensors& history, const at::Tensor& coeffs) {
          return tdiff::direct::multistep_update_cpu(x, history, coeffs);
        },
        release);
  m.def("multistep_update_convert_cpu",
        [](const at::Tensor& x, const tensors& history, const at::Tensor& coeffs, const maybe& uncond,
           const maybe& scale, const maybe& src, const maybe& convert) {
          return tdiff::direct::multistep_update_convert_cpu(x, history, coeffs, uncond, scale, src, convert);
        },
        release);
  m.def("multistep_update_out_cpu",
        [](const at::Tensor& x, const tensors& history, const at::Tensor& coeffs, const maybe& uncond,
           const maybe& scale, const maybe& src, const maybe& convert, const at::Tensor& out, const maybe& h0) {
          tdiff::direct::multistep_update_out_cpu(x, history, coeffs, uncond, scale, src, convert, out, h0);
        },
        release);
  m.def("noisy_sample_cpu",
        [](const at::Tensor& x0, const at::Tensor& eps, const at::Tensor& t, int64_t kind,
           const std::vector<double>& params, const maybe& table, double precond_sigma_data,
           const std::vector<double>& fdm, int64_t fdm_on, bool write_input) {
          return tdiff::direct::noisy_sample_cpu(x0, eps, t, kind, params, table, precond_sigma_data, fdm, fdm_on,
                                                 write_input);
        },
        release);
  py::class_<tdiff::direct::NoisySampler>(m, "NoisySampler")
      .def(py::init<int64_t, const std::vector<double>&, const maybe&, double, const std::vector<double>&, int64_t>(),
           py::arg("kind"), py::arg("params"), py::arg("table"), py::arg("precond_sigma_data"), py::arg("fdm"),
           py::arg("fdm_on"))
      .def("__call__", &tdiff::direct::NoisySampler::operator(), release);
  m.def("weighted_mse_cpu", &tdiff::direct::weighted_mse_cpu, release);
  m.def("cached_block_cpu", &tdiff::direct::cached_block_cpu, release);
}
