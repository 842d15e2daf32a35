// std::vector on 64-byte (cache-line) aligned storage, for buffers the SIMD kernels read
// a whole vector at a time.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace meswitch::cpu::detail {

// Cache-line aligned storage for what the SIMD kernels load a whole vector at a time:
// a 64-byte load from a 16-byte aligned malloc block splits across two cache lines,
// which costs the integer kernel about a quarter of its speed.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::size_t kAlignment = 64;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kAlignment))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(kAlignment)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace meswitch::cpu::detail
