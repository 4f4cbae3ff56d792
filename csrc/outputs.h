// Output allocation for the CPU ops: fresh contiguous tensors (their fakes promise exactly that).
//
// In-cache outputs (up to kRecycleBytes) come from a small last-in first-out cache of freed output blocks, so an op
// called in a loop that drops its outputs writes into the blocks it wrote last time, which are still in cache.
// glibc does the opposite: it serves a request from the free chunk of that size freed longest ago, so such a loop
// cycles its outputs over every free chunk of the size and writes into its coldest lines (measured 2026-12-01,
// 16x4x32x32 float32: two outputs used 4-6 distinct buffers; a ring of 3-4 output pairs takes 1.3-1.6x the time of
// one, bench/multistep_update.py output_ring). The cache holds at most kRecycleBlocks blocks and kRecycleTotal bytes
// (freed blocks beyond that go back to the system allocator); it concerns only the blocks of tdiff's outputs, and
// holds no reference to a live tensor (a block enters it when its storage dies), so storage reference counts are
// what they would be. Larger outputs take the default CPU allocator.
//
// The tensor is made without a dispatcher call (at::empty costs one, about a microsecond with its memory-format
// logic); a profiler still sees every output as a "tdiff::new_output" event (tests/test_solvers.py counts them).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/record_function.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <cstddef>
#include <mutex>

namespace tdiff {

class OutputAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kRecycleBytes = size_t(1) << 20;  // in-cache outputs
  static constexpr int kRecycleBlocks = 8;
  static constexpr size_t kRecycleTotal = size_t(4) << 20;

  c10::DataPtr allocate(size_t n) override {
    if (n == 0 || n > kRecycleBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    void* base = take(n);
    if (base == nullptr) {
      base = c10::alloc_cpu(n + kHeader);  // 64-byte aligned, like the default CPU allocator
      *static_cast<size_t*>(base) = n;
    }
    return {static_cast<char*>(base) + kHeader, base, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static OutputAllocator& get() {
    static auto* instance = make();  // never destroyed: tensors may die after static destructors
    return *instance;
  }

 private:
  // the block's size lives in a header before the data (the deleter receives only the context pointer)
  static constexpr size_t kHeader = 64;
  struct Block {
    void* base;
    size_t n;
  };

  // The instance, with fork handlers: a fork() while another thread holds the lock (a DataLoader worker started
  // while a tensor dies elsewhere) would leave it locked forever in the child. The lock is taken across the fork,
  // and released on both sides.
  static OutputAllocator* make() {
    auto* self = new OutputAllocator();
    pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); }, [] { get().mutex_.unlock(); });
    return self;
  }

  // The most recently freed block of exactly n bytes, or nullptr.
  void* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int i = count_ - 1; i >= 0; --i) {
      if (free_[i].n == n) {
        void* base = free_[i].base;
        for (int j = i; j + 1 < count_; ++j) free_[j] = free_[j + 1];
        --count_;
        total_ -= n;
        return base;
      }
    }
    return nullptr;
  }

  static void release(void* base) {
    OutputAllocator& self = get();
    const size_t n = *static_cast<size_t*>(base);
    std::lock_guard<std::mutex> lock(self.mutex_);
    // the least recently freed blocks make room (freed while the lock is held: rare, and never on a hot path)
    while (self.count_ > 0 && (self.count_ == kRecycleBlocks || self.total_ + n > kRecycleTotal)) {
      c10::free_cpu(self.free_[0].base);
      self.total_ -= self.free_[0].n;
      for (int j = 0; j + 1 < self.count_; ++j) self.free_[j] = self.free_[j + 1];
      --self.count_;
    }
    self.free_[self.count_++] = {base, n};  // n <= kRecycleBytes <= kRecycleTotal: it fits now
    self.total_ += n;
  }

  std::mutex mutex_;
  Block free_[kRecycleBlocks]{};
  int count_ = 0;
  size_t total_ = 0;
};

// A contiguous, uninitialised CPU tensor.
inline at::Tensor new_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  RECORD_FUNCTION("tdiff::new_output", std::vector<c10::IValue>());
  return at::Tensor(at::detail::empty_generic(sizes, &OutputAllocator::get(),
                                              c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt));
}

// A contiguous, uninitialised CPU tensor with the shape and dtype of `like`.
inline at::Tensor new_cpu_like(const at::Tensor& like) { return new_cpu(like.sizes(), like.scalar_type()); }

}  // namespace tdiff
