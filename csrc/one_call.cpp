// nllfused._C.cross_entropy_one_call: the Python entry of the one-call path for CPU tensors.
//
// nllfused.cross_entropy hands it its arguments as they came. If the call is one torch's own
// cross_entropy could make and needs nothing from the general path's checks and conversions
// (nllfused/functional.py), this returns the loss from one call to the dispatcher op
// nllfused::cross_entropy_loss (csrc/loss.cpp: canonical views, kernel, reduction and autograd in
// C++); otherwise None, and the general path runs. Every test is a type or value read in C++,
// so that a 10-class batch costs about what torch's own call costs: the same tests written in
// Python took a quarter of torch's whole call, and going through the op's Python binding (which
// converts the arguments against the schema) another tenth.
//
// The rules are those of functional._one_call_reduction, which still serves CUDA tensors (there
// for index targets of batched inputs only):
//   input, target, weight exact torch.Tensor (no subclass, so no __torch_function__ to honour),
//   int64 targets (here uint8, int32 too) of the input's shape less the class dimension, or
//   (the loss alone, no statistics) probability targets of the input's shape in a floating
//   dtype, not requiring grad, with a negative ignore_index (torch refuses others); input with
//   classes, of 2 or more dimensions or (the loss alone) unbatched (C,), in
//   float16/bfloat16/float32/float64; weight None or (C,) contiguous in a floating dtype (here;
//   CUDA: the accumulation dtype), not requiring grad; size_average, reduce (the caller
//   resolves them into reduction first) None;
//   reduction "none" / "mean" / "sum"; ignore_index an int; label_smoothing a number in [0, 1];
//   for the loss alone or with lse / z_loss only (here, not on CUDA) z_loss a finite number
//   >= 0, logit_scale a finite number, softcap None or a finite number > 0 -- with other
//   statistics z_loss 0, logit_scale 1, softcap None; backend "auto" or "cpu"; every tensor on
//   the CPU; no autocast (here: with 16-bit logits, the loss alone), no torch.func transform, no
//   torch-function mode. torch.compile and forward-mode AD are ruled out by the Python caller
//   (they are Python state).
#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/safe_numerics.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>

#include "checks.h"
#include "loss.h"

#include <cmath>
#include <optional>
#include <tuple>

namespace nllfused {
namespace {

using at::Tensor;

// A Python int or float (not bool, not a subclass), as a double; nullopt for anything else.
std::optional<double> exact_number(PyObject* o) {
  if (PyFloat_CheckExact(o)) return PyFloat_AS_DOUBLE(o);
  if (PyLong_CheckExact(o)) {
    const double v = PyLong_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {  // too large for a double: not a value of ours
      PyErr_Clear();
      return std::nullopt;
    }
    return v;
  }
  return std::nullopt;
}

// at::Reduction's number for "none" / "mean" / "sum", -1 for anything else.
int64_t reduction_code(PyObject* o) {
  if (!PyUnicode_CheckExact(o)) return -1;
  if (PyUnicode_CompareWithASCIIString(o, "mean") == 0) return 1;
  if (PyUnicode_CompareWithASCIIString(o, "sum") == 0) return 2;
  if (PyUnicode_CompareWithASCIIString(o, "none") == 0) return 0;
  return -1;
}

// numel x element size past int64, which only an expanded view can have (torch: "Storage size
// calculation overflowed"): the kernels would read its 2^62 elements for ever.
bool storage_overflows(const Tensor& t) {
  int64_t bytes = 0;
  return c10::mul_overflows(t.numel(), static_cast<int64_t>(t.element_size()), &bytes);
}

bool is_str(PyObject* o, const char* s) {
  return PyUnicode_CheckExact(o) && PyUnicode_CompareWithASCIIString(o, s) == 0;
}

// A torch.func transform is on: functorch includes its front-mode key in the thread's dispatch
// keys while a transform runs, and wraps the tensors it sees (grad, vmap).
bool torch_func_active(const Tensor& input) {
  using c10::DispatchKey;
  return c10::impl::tls_is_dispatch_key_included(DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         input.key_set().has_any(c10::functorch_transforms_ks);
}

Tensor call_cross_entropy_loss(const Tensor& input, const Tensor& target,
                               const std::optional<Tensor>& weight, int64_t reduction,
                               int64_t ignore_index, double label_smoothing, double z_loss,
                               double logit_scale, double softcap,
                               std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nllfused::cross_entropy_loss", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                     int64_t, int64_t, double, double, double, double,
                                     std::optional<at::ScalarType>)>();
  return op.call(input, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                 logit_scale, softcap, dtype);
}

using StatsOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

StatsOutputs call_cross_entropy_loss_stats(const Tensor& input, const Tensor& target,
                                           const std::optional<Tensor>& weight, int64_t reduction,
                                           int64_t ignore_index, double label_smoothing,
                                           int64_t want, double z_loss, double logit_scale,
                                           double softcap) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nllfused::cross_entropy_loss_stats", "")
                       .typed<StatsOutputs(const Tensor&, const Tensor&,
                                           const std::optional<Tensor>&, int64_t, int64_t, double,
                                           int64_t, double, double, double)>();
  return op.call(input, target, weight, reduction, ignore_index, label_smoothing, want, z_loss,
                 logit_scale, softcap);
}

// want: 0 for the loss alone; else a mask of statistics (csrc/loss_stats.cpp), and the result
// is the tuple of nllfused::cross_entropy_loss_stats's seven outputs.
py::object one_call(py::handle input_, py::handle target_, py::handle weight_,
                    py::handle size_average, py::handle ignore_index_, py::handle reduce,
                    py::handle reduction_, py::handle label_smoothing_, py::handle z_loss,
                    py::handle logit_scale, py::handle softcap, py::handle backend,
                    int64_t want) {
  const py::object general = py::none();
  if (!THPVariable_CheckExact(input_.ptr()) || !THPVariable_CheckExact(target_.ptr()) ||
      !size_average.is_none() || !reduce.is_none())
    return general;
  const Tensor& input = THPVariable_Unpack(input_.ptr());
  const Tensor& target = THPVariable_Unpack(target_.ptr());
  // (sparse tensors, a storage size past int64: the general path names the problem)
  if (!input.is_cpu() || !target.is_cpu() || input.layout() != at::kStrided ||
      target.layout() != at::kStrided || storage_overflows(input) ||
      !is_float_dtype(input.scalar_type()) ||
      input.dim() < 1)
    return general;
  const int64_t classes = input.size(input.dim() == 1 ? 0 : 1);
  if (classes == 0 || (input.dim() == 1 && want != 0)) return general;
  // Probability targets: the loss alone, targets needing no gradient (nor statistics: the
  // statistics' one-call op takes class indices).
  const bool prob = is_float_dtype(target.scalar_type()) && target.sizes() == input.sizes() &&
                    !target.requires_grad() && want == 0;
  // Index targets: int64, or uint8 (segmentation masks), as torch takes them; its Byte targets
  // go to the kernels as they are (ce_cpu.cpp, make_args), with no int64 copy. int32 ones (which
  // torch refuses, nllfused takes) as an int64 copy: a tenth of a 10-class row's bytes.
  const auto tt = target.scalar_type();
  // (index targets: the input's shape less the class dimension, target_shape_matches; for an
  // unbatched (C,) input a 0-dim index only: a (1,) one takes the general path, which gives
  // torch's 0-dim 'none' loss)
  if (!prob && ((tt != at::kLong && tt != at::kByte && tt != at::kInt) ||
                !one_call_ops::target_shape_matches(input, target) ||
                (input.dim() == 1 && target.dim() != 0)))
    return general;
  const int64_t reduction = reduction_code(reduction_.ptr());
  if (reduction < 0 || !PyLong_CheckExact(ignore_index_.ptr())) return general;
  int overflow = 0;
  const long long ignore_index = PyLong_AsLongLongAndOverflow(ignore_index_.ptr(), &overflow);
  if (overflow != 0 || (ignore_index == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return general;
  }
  if (prob && ignore_index >= 0) return general;  // torch refuses it: the general path says so
  const auto smoothing = exact_number(label_smoothing_.ptr());
  const auto z = exact_number(z_loss.ptr()), scale = exact_number(logit_scale.ptr());
  const auto cap = softcap.is_none() ? std::optional<double>(0.0) : exact_number(softcap.ptr());
  if (!smoothing || !(*smoothing >= 0 && *smoothing <= 1) || !z || !scale || !cap ||
      !(is_str(backend.ptr(), "auto") || is_str(backend.ptr(), "cpu")))
    return general;
  // The extras: values the general path takes (nllfused/_checks.py, check_options), else it
  // names the problem; with statistics, only with lse and z_loss (csrc/loss_stats.cpp: bits 0,
  // 1 and 6), which need nothing of the kernels' statistics pass.
  constexpr int64_t kLseAndZLoss = 1 | 2 | 64;
  const bool extras = *z != 0 || *scale != 1 || !softcap.is_none();
  if (extras && ((want & ~kLseAndZLoss) != 0 || !(*z >= 0 && std::isfinite(*z)) ||
                 !std::isfinite(*scale) ||
                 (!softcap.is_none() && !(*cap > 0 && std::isfinite(*cap)))))
    return general;
  std::optional<Tensor> weight;
  if (!weight_.is_none()) {
    if (!THPVariable_CheckExact(weight_.ptr())) return general;
    const Tensor& w = THPVariable_Unpack(weight_.ptr());
    if (!is_float_dtype(w.scalar_type()) || w.dim() != 1 || w.size(0) != classes ||
        !w.is_cpu() || w.requires_grad() || !w.is_contiguous())
      return general;
    // Probability targets' loss takes the weights' dtype too, as torch's -(w q log p).sum()
    // (bf16 logits and targets with float32 weights: a float32 loss): the general path, which
    // rounds the float32 sum once to it (the op's loss would be rounded to bf16 first).
    const auto out = one_call_ops::loss_dtype(input, target);
    if (prob && at::promote_types(out, w.scalar_type()) != out) return general;
    weight = w;
  }
  // Under autocast, which runs cross_entropy in float32: 16-bit logits' loss alone, asked of
  // the op in float32 (the kernels read them as they are); others as they are.
  std::optional<at::ScalarType> dtype;
  if (at::autocast::is_autocast_enabled(at::kCPU) &&
      (input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16)) {
    if (want != 0) return general;
    // (probability targets: autocast casts 16-bit ones to float32, leaves float64 ones)
    dtype = prob ? at::promote_types(at::kFloat, target.scalar_type()) : at::kFloat;
  }
  if (at::impl::torch_function_mode_enabled() || torch_func_active(input) ||
      (weight && torch_func_active(*weight)))
    return general;
  const Tensor target_arg = tt == at::kInt && !prob ? target.to(at::kLong) : target;
  if (weight) {
    // The op takes them in the accumulation dtype: torch's own bf16 / fp16 weights (it asks
    // for the input's dtype) converted here, as the general path converts any floating weight
    // (_checks.check_weight); there they cost a 10-class bf16 batch 5x torch's time. Under
    // torch.jit.trace by an op the tracer records (it sees no raw loop: an empty weight).
    const auto acc = acc_dtype(input.scalar_type());
    weight = torch::jit::tracer::isTracing() ? weight->to(acc)
                                             : one_call_ops::as_dtype(*weight, acc);
  }
  if (want != 0) {
    StatsOutputs out;
    {
      py::gil_scoped_release no_gil;
      out = call_cross_entropy_loss_stats(input, target_arg, weight, reduction, ignore_index,
                                          *smoothing, want, *z, *scale, *cap);
    }
    auto wrap = [](Tensor& t) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(t)); };
    auto& [a, b, c, d, e, f, g] = out;
    return py::make_tuple(wrap(a), wrap(b), wrap(c), wrap(d), wrap(e), wrap(f), wrap(g));
  }
  Tensor loss;
  {
    py::gil_scoped_release no_gil;  // as torch's own bindings: other Python threads run meanwhile
    loss = call_cross_entropy_loss(input, target_arg, weight, reduction, ignore_index, *smoothing,
                                   *z, *scale, *cap, dtype);
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(loss)));
}

}  // namespace

void register_one_call(py::module_& m) {
  m.def("cross_entropy_one_call", &one_call,
        "The loss of a torch-compatible CPU cross_entropy call from one C++ call (with want, a "
        "mask of statistics: nllfused::cross_entropy_loss_stats's outputs), or None where the "
        "general path must run (csrc/one_call.cpp).");
}

}  // namespace nllfused
