#include "host_indices.h"

#include <c10/core/TensorImpl.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/intrusive_ptr.h>

#include <cstddef>
#include <cstdint>
#include <list>
#include <mutex>
#include <vector>

#include "msda/msda.h"

namespace msda::torch_ops {
namespace {

using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
using WeakStorage = c10::weak_intrusive_ptr<c10::StorageImpl>;

// What identifies one state of a tensor: the TensorImpl and its StorageImpl (each held weakly by
// the entry, which keeps their addresses from being reused while it lives), its version counter,
// and where and how its data lies. `t.data = other` keeps the TensorImpl and the version but
// swaps the storage, and the caching allocator may hand the freed block straight back at the same
// address: the storage tells the two apart.
struct Key {
  const c10::TensorImpl* impl;
  const c10::StorageImpl* storage;
  std::uint32_t version;
  const void* data;
  std::vector<std::int64_t> sizes, strides;
  at::ScalarType dtype;
  at::Device device;

  static Key of(const at::Tensor& t) {
    return {t.unsafeGetTensorImpl(),
            t.storage().unsafeGetStorageImpl(),
            t.unsafeGetTensorImpl()->version_counter().current_version(),
            t.const_data_ptr(),  // (data_ptr() would materialise a copy-on-write storage)
            t.sizes().vec(),
            t.strides().vec(),
            t.scalar_type(),
            t.device()};
  }
  bool operator==(const Key& o) const {
    return impl == o.impl && storage == o.storage && version == o.version && data == o.data && sizes == o.sizes &&
           strides == o.strides && dtype == o.dtype && device == o.device;
  }
};

struct Entry {
  WeakTensor tensor;
  WeakStorage storage;
  Key key;
  at::Tensor host;
};

// A few entries suffice (a model passes one spatial_shapes and one level_start_index per
// feature pyramid, the same tensors every step); the least recently used goes first.
class Cache {
 public:
  static constexpr std::size_t kEntries = 16;

  // The host copy of `t` if one of its current state is kept, else an undefined tensor.
  at::Tensor find(const Key& key) {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->tensor.expired() || it->storage.expired()) {
        it = entries_.erase(it);
        continue;
      }
      if (it->key == key) {  // (the key names the TensorImpl, which the live entry holds)
        entries_.splice(entries_.begin(), entries_, it);
        return entries_.front().host;
      }
      ++it;
    }
    return {};
  }

  void keep(const at::Tensor& t, Key key, at::Tensor host) {
    const std::lock_guard<std::mutex> lock(mutex_);
    // An older state of the same tensor is of no more use.
    entries_.remove_if([&](const Entry& e) { return e.key.impl == key.impl; });
    entries_.push_front({WeakTensor(t.getIntrusivePtr()), t.storage().getWeakStorageImpl(), std::move(key),
                         std::move(host)});
    if (entries_.size() > kEntries) entries_.pop_back();
  }

 private:
  std::mutex mutex_;
  std::list<Entry> entries_;
};

Cache& cache() {
  static Cache* c = new Cache;  // never destroyed: torch may free tensors after static destructors ran
  return *c;
}

at::Tensor to_host(const at::Tensor& t) { return t.to(at::kCPU, at::kLong).contiguous(); }

// A CUDA graph capture forbids the copy (it would end the capture with a CUDA error that names
// nothing): say which tensor and what to do instead.
void refuse_copy_while_capturing(const at::Tensor& t, const char* argument) {
  if (!t.is_cuda()) return;
  void* stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device()).native_handle();
  if (!cuda_stream_capturing(stream)) return;
  if (t.is_inference())
    throw Error(argument, "a tensor made outside torch.inference_mode() (msda keeps the host copy of such a tensor "
                          "by its version counter, which inference tensors lack)",
                "an inference tensor, whose values only a device-to-host copy could tell, which the capture forbids");
  throw Error(argument,
              "a tensor msda has read before the CUDA graph capture began, unchanged since (run the same "
              "tensor through the op once before capturing, as a warm-up does; keep it in a buffer or a "
              "static input)",
              "a tensor msda has not read yet, whose values only a device-to-host copy could tell, which "
              "the capture forbids");
}

std::tuple<at::Tensor, bool> through_cache(const at::Tensor& t, const char* argument) {
  if (t.is_inference()) {
    refuse_copy_while_capturing(t, argument);
    return {to_host(t), false};
  }
  Key key = Key::of(t);
  if (at::Tensor host = cache().find(key); host.defined()) return {host, true};
  refuse_copy_while_capturing(t, argument);
  // The copy runs outside the lock: it waits for t's stream, which must not hold up other threads.
  at::Tensor host = to_host(t);
  if (host.const_data_ptr() == t.const_data_ptr()) host = host.clone();  // a CPU int64 tensor: a copy, not an alias
  cache().keep(t, std::move(key), host);
  return {host, false};
}

}  // namespace

at::Tensor host_indices(const at::Tensor& t, const char* argument) {
  if (t.scalar_type() != at::kLong && t.scalar_type() != at::kInt)
    throw Error(argument, "an integer tensor (int64 or int32)", c10::toString(t.scalar_type()));
  if (t.is_cpu()) return to_host(t);
  return std::get<0>(through_cache(t, argument));
}

std::tuple<at::Tensor, bool> host_indices_cached(const at::Tensor& t) {
  auto [host, hit] = through_cache(t, "t");
  return {host.clone(), hit};  // the cache's own copy stays the cache's
}

}  // namespace msda::torch_ops
