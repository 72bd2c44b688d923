// A stored decode step (an AOTInductor package) run through PyTorch's dispatcher, which lets go
// of Python's GIL while it runs: torch's own binding (torch._C._aoti) holds the GIL for a whole
// step, so a server's event loop could not send out the token a step had just made, nor read a
// request, while the next step ran (~10-25 ms each on the default model).
//
// Built into fusionlm's kernel library by fusionlm/inference/cpu_kernels.py, beside
// cpu_kernels.cpp, and used by fusionlm/inference/decode_step.py:
//   runner = torch.classes.fusionlm.StepRunner(path)
//   runner.metadata() -> {str: str}; runner.constant_fqns() -> [str]
//   runner.bind(constants)  // {name: tensor}, the caller's own tensors, not copied
//   torch.ops.fusionlm.run_step(runner, inputs) -> outputs

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

struct StepRunner : torch::CustomClassHolder {
  // One runner, on the calling thread's OpenMP team (as torch._C._aoti loads it).
  explicit StepRunner(const std::string& path) : loader(path, "model", false, 1, -1) {}

  c10::Dict<std::string, std::string> metadata() {
    c10::Dict<std::string, std::string> result;
    for (const auto& [key, value] : loader.get_metadata()) result.insert(key, value);
    return result;
  }

  std::vector<std::string> constant_fqns() { return loader.get_constant_fqns(); }

  // The step computes with these tensors from now on (user-managed: AOTInductor keeps a
  // reference to each for good; see decode_step._bind).
  void bind(const c10::Dict<std::string, at::Tensor>& constants) {
    std::unordered_map<std::string, at::Tensor> map;
    for (const auto& item : constants) map.emplace(item.key(), item.value());
    loader.load_constants(map, /*use_inactive=*/false, /*check_full_update=*/true,
                          /*user_managed=*/true);
  }

  torch::inductor::AOTIModelPackageLoader loader;
};

std::vector<at::Tensor> run_step(const c10::intrusive_ptr<StepRunner>& runner,
                                 std::vector<at::Tensor> inputs) {
  return runner->loader.boxed_run(std::move(inputs), nullptr);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusionlm, m) {
  m.class_<StepRunner>("StepRunner")
      .def(torch::init<std::string>())
      .def("metadata", &StepRunner::metadata)
      .def("constant_fqns", &StepRunner::constant_fqns)
      .def("bind", &StepRunner::bind);
  // runner, inputs -> the step's outputs
  m.def("run_step(__torch__.torch.classes.fusionlm.StepRunner runner, Tensor[] inputs) -> Tensor[]",
        &run_step);
}
