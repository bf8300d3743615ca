// C++ serving without Python (SPEC "Deployment"): runs an AOTInductor package of a model with
// msda's ops (examples/aoti_export.py writes it) from libtorch, and checks it against the eager
// outputs written beside it.
//
//   msda_aoti_run DIR     (DIR/model.pt2 and DIR/cases.pt from aoti_export.py)
//
// The compiled model calls msda::ms_deform_attn and msda::ms_deform_attn_fused through
// AOTInductor's proxy executor, which looks them up in the dispatcher by name: this program links
// libmsda_torch.so (-Wl,--no-as-needed), whose static initialisers register them. A program
// could dlopen the library instead, before loading the package. Without it the loader throws
// "Could not find schema for msda::ms_deform_attn_fused". The package's compiled model (a shared
// library the loader dlopens) needs libtorch.so and libtorch_cpu.so, which this program links.
// Exit code 0 (PASS) or 1 (FAIL).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

// cases.pt: torch.save of a list of {"inputs": [Tensor], "outputs": [Tensor]}.
struct Case {
  std::vector<torch::Tensor> inputs, outputs;
};

std::vector<torch::Tensor> tensors(const c10::IValue& list) {
  std::vector<torch::Tensor> out;
  for (const c10::IValue& t : list.toListRef()) out.push_back(t.toTensor());
  return out;
}

std::vector<Case> load_cases(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "cannot open ", path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const c10::IValue saved = torch::pickle_load(bytes);  // kept alive: toListRef() views into it
  std::vector<Case> cases;
  for (const c10::IValue& entry : saved.toListRef()) {
    const c10::Dict<c10::IValue, c10::IValue> dict = entry.toGenericDict();
    cases.push_back({tensors(dict.at("inputs")), tensors(dict.at("outputs"))});
  }
  return cases;
}

std::string sizes(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR   (DIR/model.pt2 and DIR/cases.pt from examples/aoti_export.py)\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  bool pass = true;
  try {
    // The ops must be registered before the package runs them (the linked op library did it).
    for (const char* op : {"msda::ms_deform_attn", "msda::ms_deform_attn_fused"})
      TORCH_CHECK(c10::Dispatcher::singleton().findSchema({op, ""}).has_value(), op,
                  " is not registered: link or load libmsda_torch.so");
    const std::vector<Case> cases = load_cases(dir + "/cases.pt");
    const auto started = std::chrono::steady_clock::now();
    torch::inductor::AOTIModelPackageLoader loader(dir + "/model.pt2");
    const double load_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
    std::printf("loaded %s/model.pt2 in %.0f ms; %zu cases\n", dir.c_str(), load_ms, cases.size());
    torch::NoGradGuard no_grad;
    for (const Case& c : cases) {
      const long long batch = c.inputs[0].size(0);
      const std::vector<torch::Tensor> got = loader.run(c.inputs);
      if (got.size() != c.outputs.size()) {
        std::printf("FAIL: batch %lld: %zu outputs, expected %zu\n", batch, got.size(), c.outputs.size());
        pass = false;
        continue;
      }
      for (size_t i = 0; i < got.size(); ++i) {
        const torch::Tensor& want = c.outputs[i];
        if (!got[i].sizes().equals(want.sizes()) || got[i].dtype() != want.dtype()) {
          std::printf("FAIL: batch %lld output %zu: sizes %s, expected %s\n", batch, i, sizes(got[i]).c_str(),
                      sizes(want).c_str());
          pass = false;
          continue;
        }
        // Max abs error relative to the output's largest magnitude (f32: <= 1e-5).
        const double err = ((got[i] - want).abs().max() / want.abs().max()).item<double>();
        const bool ok = err <= 1e-5;
        std::printf("%s: batch %lld output %zu %s: max rel error %.2e\n", ok ? "ok" : "FAIL", batch, i,
                    sizes(want).c_str(), err);
        pass = pass && ok;
      }
    }
  } catch (const std::exception& e) {
    std::printf("FAIL: %s\n", e.what());
    return 1;
  }
  std::printf("%s\n", pass ? "PASS" : "FAIL");
  return pass ? 0 : 1;
}
