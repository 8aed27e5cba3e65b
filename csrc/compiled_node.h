// Compiled autograd for the one-call graph nodes (csrc/loss.cpp, csrc/loss_stats.cpp).
//
// Compiled autograd (torch._dynamo.compiled_autograd) captures a backward node by node. A node
// that ran its backward's ops during that capture would see, for the gradients earlier nodes
// produce, the capture's placeholders (tensors of no elements), not tensors of the gradients'
// shapes: only a loss that is the backward's root worked. So, as torch's own nodes do, a node
// puts into the captured graph one call of a functional form of its backward, whose arguments
// are the gradients, the saved tensors and the options; dynamo runs that call on fake tensors
// as it compiles the graph, and on the real ones when the graph runs. (With create_graph=True
// the call is one dynamo does not trace: it runs eagerly as the graph runs; see capture.)
//
// A node type N provides: a static kFunctionalName; static each_saved(node, f) and
// each_option(node, f), templates on the node's type (const where only read), calling f on
// every saved variable and every option member (int64_t, double or bool), always in the same
// order; and backward(grads, needed), its backward given whether the input's gradient is
// wanted (apply asks task_should_compute_output(0)).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace nllfused::compiled_node {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using torch::dynamo::autograd::IValuePacker;
using torch::dynamo::autograd::PackedArgs;

// The options are part of the cache key of the captured graph: they are constants in it.
template <class N>
void collect(const N& node, torch::dynamo::autograd::CompiledNodeArgs& args) {
  N::each_saved(node, [&](const SavedVariable& v) { args.collect(v, false); });
  N::each_option(node, [&](const auto& o) { args.collect(o); });
}

// The functional form: a node rebuilt from the packed arguments, its backward.
template <class N>
variable_list functional_backward(const variable_list& grads,
                                  const std::vector<c10::IValue>& args) {
  PackedArgs packed(args);
  auto node = std::make_shared<N>();
  N::each_saved(*node, [&](SavedVariable& v) {
    const auto t = packed.unpack<std::optional<at::Tensor>>();
    v = SavedVariable(t.value_or(at::Tensor()), false);
  });
  N::each_option(*node, [&](auto& o) { o = packed.unpack<std::decay_t<decltype(o)>>(); });
  const bool needed = packed.unpack<bool>();
  return node->backward(grads, needed);
}

// The same, called eagerly as the graph runs (create_graph=True, see capture): its nested
// autograd call runs the engine, which refuses to start while the caller holds the GIL.
template <class N>
variable_list functional_backward_eager(const variable_list& grads,
                                        const std::vector<c10::IValue>& args) {
  pybind11::gil_scoped_release no_gil;
  return functional_backward<N>(grads, args);
}

// apply_with_saved: the call of functional_backward<N>, captured into the graph.
template <class N>
variable_list capture(N& node, const variable_list& grads,
                      torch::dynamo::autograd::SwapSavedVariables& saved) {
  N::each_saved(node, [&](SavedVariable& v) { saved.before(v); });
  PackedArgs packed;
  std::vector<at::TypePtr> schema;
  N::each_saved(node, [&](SavedVariable& v) {
    const at::Tensor t = v.unpack();
    packed.pack(t.defined() ? std::optional<at::Tensor>(t) : std::nullopt);
    schema.push_back(IValuePacker<std::optional<at::Tensor>>::packed_type());
  });
  N::each_option(node, [&](auto& o) {
    packed.pack(o);
    schema.push_back(IValuePacker<std::decay_t<decltype(o)>>::packed_type());
  });
  packed.pack(node.task_should_compute_output(0));
  schema.push_back(IValuePacker<bool>::packed_type());
  const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
  // create_graph=True: the backward differentiates torch's formula by a nested autograd call
  // (torch_loss_grad), which dynamo's run on fake tensors cannot make; that call then runs
  // eagerly, on the real tensors as the graph runs (a graph break), under a second name.
  const bool eager = at::GradMode::is_enabled();
  static const std::string eager_name = std::string(N::kFunctionalName) + "_eager";
  // Bound once a process, under its names (the bindings are global, as torch's own nodes').
  static std::once_flag bound, bound_eager;
  std::call_once(eager ? bound_eager : bound, [&] {
    py->bind_function(saved.get_py_compiler(), eager ? eager_name : N::kFunctionalName,
                      eager ? functional_backward_eager<N> : functional_backward<N>, schema,
                      /*is_custom_function=*/false, /*is_traceable=*/!eager);
  });
  const auto output_metadata =
      IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
          torch::dynamo::autograd::get_input_metadata(node.next_edges()));
  variable_list out = py->call_function(saved.get_py_compiler(), "apply_functional",
                                        eager ? eager_name : N::kFunctionalName, grads,
                                        std::move(packed).vec(), output_metadata);
  N::each_saved(node, [&](SavedVariable& v) { saved.after(v); });
  return out;
}

}  // namespace nllfused::compiled_node
