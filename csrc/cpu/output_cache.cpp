// The CPU ops' output cache (output_cache.h says why).
#include "output_cache.h"
#include "settings.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <deque>
#include <mutex>

namespace nllfused_cpu {
namespace {

// Smaller buffers come from glibc's heap, its pages mapped already.
constexpr size_t kMinBytes = size_t(1) << 20;
// At most this many idle blocks, so that finding one is a short scan.
constexpr size_t kMaxIdleBlocks = 16;

size_t cap_bytes() {
  const std::string env = setting(Setting::kCacheMb);
  if (env.empty()) return size_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env.c_str(), &end, 10);
  return (end == env.c_str() || mb <= 0) ? 0 : size_t(mb) << 20;
}

struct Block {
  void* ptr;
  size_t size;
};

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        if (it->size == n) {
          p = it->ptr;
          idle_bytes_ -= n;
          idle_.erase(it);
          ++hits_;
          break;
        }
      }
      if (p == nullptr) ++misses_;
      live_bytes_ += n;
    }
    if (p == nullptr) p = c10::alloc_cpu(n);
    report(p, static_cast<int64_t>(n));
    return {p, new Block{p, n}, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  std::map<std::string, int64_t> info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {{"idle_bytes", static_cast<int64_t>(idle_bytes_)},
            {"idle_blocks", static_cast<int64_t>(idle_.size())},
            {"cap_bytes", static_cast<int64_t>(cap_bytes())},
            {"hits", hits_},
            {"misses", misses_}};
  }

  void empty() {
    std::deque<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      drop.swap(idle_);
      idle_bytes_ = 0;
    }
    for (const Block& b : drop) c10::free_cpu(b.ptr);
  }

 private:
  static void release(void* ctx);

  void give_back(Block b) {
    report(b.ptr, -static_cast<int64_t>(b.size));
    const size_t cap = cap_bytes();
    std::deque<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_bytes_ -= b.size;
      if (b.size <= cap) {
        idle_.push_back(b);  // newest last; the oldest go first
        idle_bytes_ += b.size;
        b.ptr = nullptr;
      }
      while (!idle_.empty() && (idle_bytes_ > cap || idle_.size() > kMaxIdleBlocks)) {
        drop.push_back(idle_.front());
        idle_bytes_ -= idle_.front().size;
        idle_.pop_front();
      }
    }
    if (b.ptr != nullptr) c10::free_cpu(b.ptr);
    for (const Block& d : drop) c10::free_cpu(d.ptr);
  }

  // As torch's CPU allocator does, so that torch.profiler's memory view sees these tensors.
  void report(void* p, int64_t delta) {
    size_t live = 0, idle = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live = live_bytes_;
      idle = idle_bytes_;
    }
    c10::reportMemoryUsageToProfiler(p, delta, live, live + idle,
                                     c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mutex_;
  std::deque<Block> idle_;
  size_t idle_bytes_ = 0, live_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors may be freed after static destructors have run.
OutputCache& cache() {
  static OutputCache* c = new OutputCache();
  return *c;
}

void OutputCache::release(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  const Block copy = *b;
  delete b;
  cache().give_back(copy);
}

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  const size_t nbytes =
      static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
  if (nbytes < kMinBytes || cap_bytes() == 0) return at::empty(sizes, at::TensorOptions(dtype));
  return at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

std::map<std::string, int64_t> cache_info() { return cache().info(); }

void cache_empty() { cache().empty(); }

}  // namespace nllfused_cpu
