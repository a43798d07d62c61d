// Operator schemas of the compiled kernels and the Python module that reports how they were built.
//
// The kernels live in the `autoselect_C` namespace: one file per op per device registers its
// implementation (TORCH_LIBRARY_IMPL). The public ops (`autoselect::*`: autograd, fake tensors,
// backend choice) are defined in Python (autoselect/ops/) and call these.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#ifndef AUTOSELECT_VERSION
#define AUTOSELECT_VERSION "unknown"
#endif
#ifndef AUTOSELECT_TORCH_VERSION
#define AUTOSELECT_TORCH_VERSION "unknown"
#endif
#ifndef AUTOSELECT_CUDA_ARCHS
#define AUTOSELECT_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(autoselect_C, m) {
  m.def(
      "noise_gate_forward(Tensor x, Tensor alpha, Tensor mean, Tensor std, Tensor? noise, "
      "int seed, int offset) -> Tensor");
  m.def(
      "noise_gate_backward(Tensor grad, Tensor x, Tensor alpha, Tensor mean, Tensor std, "
      "Tensor? noise, int seed, int offset, bool need_x_grad, bool need_alpha_grad) "
      "-> (Tensor, Tensor)");
  // The last output of both is `finite`: a 0-dim bool, false when a score was NaN or inf. The kernels
  // read every score anyway, so the op checks it with one device assert and no extra pass (select.h).
  m.def("select_topk(Tensor x, Tensor scores, int[] lengths, int[] ks) -> (Tensor, Tensor, Tensor)");
  m.def(
      "score_select(Tensor x, Tensor hidden, Tensor col_sum, Tensor bias, Tensor w2, Tensor b2, float eps, "
      "int[] lengths, int[] ks) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "autoselect compiled kernels (C++ CPU, and CUDA when built with it)";
  module.def("build_info", [] {
    py::dict info;
    info["version"] = AUTOSELECT_VERSION;
#ifdef AUTOSELECT_WITH_CUDA
    info["cuda"] = true;
    info["cuda_archs"] = AUTOSELECT_CUDA_ARCHS;
#else
    info["cuda"] = false;
    info["cuda_archs"] = "";
#endif
    info["torch_version"] = AUTOSELECT_TORCH_VERSION;
    return info;
  }, "How this extension was built: package version, CUDA or not, compiled archs, torch version.");
}
