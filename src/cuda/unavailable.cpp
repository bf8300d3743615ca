// The cuda backend of a build without nvcc: every request for it is the Error of a backend this
// build lacks, so the rest of the library builds and runs everywhere.
#include "cuda.h"

namespace msda::cuda {
namespace {

[[noreturn]] void refuse() {
  throw Error("options.backend", "a backend this build has (msda was built without CUDA: CMake found no nvcc)",
              "cuda");
}

}  // namespace

bool built() noexcept { return false; }
bool available() noexcept { return false; }
bool stream_capturing(void*) noexcept { return false; }
std::size_t workspace_size(const Params&, bool) { refuse(); }
void forward(const Params&) { refuse(); }
void backward(const Params&) { refuse(); }
void fill_zeros(const Params&, void*, std::size_t) { refuse(); }

}  // namespace msda::cuda
