// Python module nllfused._C: importing it registers the ops (TORCH_LIBRARY in the other
// files of this extension) and exposes build facts.
#include <torch/extension.h>

#ifndef NLLFUSED_TORCH_VERSION
#define NLLFUSED_TORCH_VERSION "unknown"
#endif
#ifndef NLLFUSED_CUDA_ARCHS
#define NLLFUSED_CUDA_ARCHS ""
#endif

static py::dict build_info() {
  py::dict info;
  info["torch_version"] = NLLFUSED_TORCH_VERSION;
#ifdef NLLFUSED_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(NLLFUSED_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string("");
#endif
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "How this extension was built.");
}
