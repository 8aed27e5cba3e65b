// Python module nllfused._C: importing it registers the ops (TORCH_LIBRARY in the other
// files of this extension) and exposes build facts and the one-call entry (csrc/one_call.cpp).
#include <torch/extension.h>

#include "cpu/kernels.h"
#include "cpu/output_cache.h"
#include "cpu/settings.h"

#ifndef NLLFUSED_TORCH_VERSION
#define NLLFUSED_TORCH_VERSION "unknown"
#endif
#ifndef NLLFUSED_CUDA_ARCHS
#define NLLFUSED_CUDA_ARCHS ""
#endif

namespace nllfused {
void register_one_call(py::module_& m);  // csrc/one_call.cpp
}

static py::dict build_info() {
  py::dict info;
  info["torch_version"] = NLLFUSED_TORCH_VERSION;
  // cuda_stats: whether ce_fwd_stats / ce_bwd_stats have CUDA kernels (csrc/cuda/ce_cuda.cu),
  // as every CUDA build since they exist has (an older in-place build lacks the key).
#ifdef NLLFUSED_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(NLLFUSED_CUDA_ARCHS);
  info["cuda_stats"] = true;
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string("");
  info["cuda_stats"] = false;
#endif
  // The copies of the CPU kernels this machine can run, and the one the ops use now
  // (csrc/cpu/ce_cpu.cpp); an invalid NLLFUSED_CPU_CAPABILITY is reported, not raised.
  info["cpu_capabilities"] = nllfused_cpu::capabilities();
  try {
    info["cpu_capability"] = nllfused_cpu::capability();
  } catch (const c10::Error& e) {
    info["cpu_capability"] = std::string("error: ") + e.what_without_backtrace();
  }
  // Classes per chunk of the CPU forward's float32 rows (kernels.h, row_chunk).
  try {
    info["cpu_row_chunk"] = nllfused_cpu::row_chunk(4);
  } catch (const c10::Error& e) {
    info["cpu_row_chunk"] = std::string("error: ") + e.what_without_backtrace();
  }
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "How this extension was built.");
  nllfused::register_one_call(m);
  m.def("cpu_cache_info", &nllfused_cpu::cache_info,
        "What the CPU ops' output cache holds (csrc/cpu/output_cache.h).");
  m.def("cpu_cache_empty", &nllfused_cpu::cache_empty,
        "Frees the idle buffers of the CPU ops' output cache.");
  m.def("reload_cpu_env", &nllfused_cpu::reload_settings,
        "Reads the CPU kernels' environment variables again (csrc/cpu/settings.h).");
}
