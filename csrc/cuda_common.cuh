// Internal helpers shared by the CUDA kernels: dtype dispatch onto CUDA storage types, fp32
// conversion, 16-byte packed loads/stores, block reductions, remembered launch queries and the
// launch error check.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common.h"

namespace mistral_ext {

// Calls fn with a value of the CUDA storage type matching `dtype` (used only for its type).
template <typename Fn>
inline void dispatch_cuda_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); return;
    case DType::kFloat16: fn(__half{}); return;
    case DType::kBFloat16: fn(__nv_bfloat16{}); return;
  }
  throw std::invalid_argument("mistral_ext: unknown dtype tag " + std::to_string(static_cast<int>(dtype)));
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even, like the CPU kernels' from_float.
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// W consecutive elements moved as one access: 16 bytes when W = kPackWidth<T>, one element
// when W = 1 (the fallback for unaligned pointers or extents that are not multiples of W).
template <typename T>
inline constexpr int kPackWidth = 16 / sizeof(T);

template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <int W, typename T>
__device__ __forceinline__ Pack<T, W> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, W>*>(p);
}

template <int W, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, W>& x) {
  *reinterpret_cast<Pack<T, W>*>(p) = x;
}

// True when 16-byte packs of T can be used: every pointer 16-byte aligned and every extent
// (row length, stride or offset, in elements) a multiple of the pack width, so no pack
// straddles a row boundary or lands misaligned.
template <typename T>
inline bool packs_fit(std::initializer_list<const void*> pointers, std::initializer_list<int64_t> extents) {
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  for (int64_t n : extents)
    if (n % kPackWidth<T> != 0) return false;
  return true;
}

// Calls fn with std::integral_constant<int, W>: W = kPackWidth<T> when `packed`, else 1.
template <typename T, typename Fn>
inline void dispatch_pack_width(bool packed, Fn&& fn) {
  if (packed)
    fn(std::integral_constant<int, kPackWidth<T>>{});
  else
    fn(std::integral_constant<int, 1>{});
}

// The block copies n elements (a multiple of W) from src to dst, W at a time.
template <int W, typename T>
__device__ __forceinline__ void block_copy(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  for (int64_t c = threadIdx.x; c < n / W; c += blockDim.x) store_pack<W>(dst + c * W, load_pack<W>(src + c * W));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum of v over the block, returned to every thread. blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// Threads for a block that loops over `items` work items: a multiple of 32, at most max_threads.
inline int block_threads(int64_t items, int max_threads) {
  const int64_t warps = (items + 31) / 32;
  return static_cast<int>(warps >= max_threads / 32 ? max_threads : (warps > 0 ? warps * 32 : 32));
}

// Programmatic dependent launch (compute capability 9.0 and up). A kernel launched with
// launch_kernel(..., overlap_previous = true) may start while the previous kernel in its stream
// still runs, as soon as every block of that kernel has called allow_next_kernel_launch() or
// exited. Every block of such a kernel must call wait_for_previous_kernel(), which returns once
// that kernel has finished and its writes are visible; since the rule holds for every kernel
// launched this way, the previous kernel's own wait makes that "every kernel before it". Until
// then a block must not touch memory that a kernel still in flight writes or reads: only data
// that stays fixed, like a model's weights. Both calls do nothing on older GPUs and in kernels
// launched without the attribute.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_kernel_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Launch queries, made once per (kernel, device) and remembered: each runtime query costs about a
// microsecond of host time, as much as a decode-step kernel runs, and a decode step launches ~200.

inline void check_cuda_query(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return;
  cudaGetLastError();  // reported here: the next launch's check must not report it again
  throw std::runtime_error(std::string("mistral_ext: CUDA query failed: ") + what + ": " + cudaGetErrorString(error));
}

inline int current_device() {
  int device = 0;
  check_cuda_query(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// What a launcher sizes its grid and shared memory by, for one kernel on the current device.
struct KernelLimits {
  int sms = 0;                      // multiprocessors
  int64_t smem_optin_bytes = 0;     // the most shared memory a block may opt in to
  int64_t static_smem_bytes = 0;    // the kernel's own __shared__ arrays, counted in the same limit
  int ptx_version = 0;              // compute capability x 10 the running code was built for
  int64_t dynamic_smem_opt_in = 0;  // dynamic shared memory the kernel has been allowed so far
};

inline std::mutex& launch_query_mutex() {
  static auto& mutex = *new std::mutex;  // guards every remembered query; never destroyed, like them
  return mutex;
}

// The remembered entry for (kernel, device); callers hold launch_query_mutex().
inline KernelLimits& kernel_limits_locked(const void* kernel, int device) {
  static auto& known = *new std::map<std::pair<const void*, int>, KernelLimits>;  // outlives static destructors
  const auto found = known.find({kernel, device});
  if (found != known.end()) return found->second;
  KernelLimits limits;
  int smem_optin = 0;
  cudaFuncAttributes attributes{};
  check_cuda_query(cudaDeviceGetAttribute(&limits.sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  check_cuda_query(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                   "shared memory per block");
  check_cuda_query(cudaFuncGetAttributes(&attributes, kernel), "kernel attributes");
  limits.smem_optin_bytes = smem_optin;
  limits.static_smem_bytes = static_cast<int64_t>(attributes.sharedSizeBytes);
  limits.ptx_version = attributes.ptxVersion;
  return known.emplace(std::make_pair(kernel, device), limits).first->second;
}

template <typename Kernel>
KernelLimits kernel_limits(Kernel kernel) {
  const int device = current_device();
  std::lock_guard<std::mutex> lock(launch_query_mutex());
  return kernel_limits_locked(reinterpret_cast<const void*>(kernel), device);
}

// Lets `kernel` use `bytes` of dynamic shared memory on the current device: above 48 KB (with its
// static arrays) a kernel must opt in. The allowance only ever grows, so a smaller request never
// takes back what a remembered larger one relies on.
template <typename Kernel>
void allow_dynamic_shared_memory(Kernel kernel, size_t bytes) {
  const int device = current_device();
  std::lock_guard<std::mutex> lock(launch_query_mutex());
  KernelLimits& limits = kernel_limits_locked(reinterpret_cast<const void*>(kernel), device);
  const int64_t needed = static_cast<int64_t>(bytes);
  if (needed <= limits.dynamic_smem_opt_in || limits.static_smem_bytes + needed <= 48 * 1024) return;
  const cudaError_t error = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (error != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("mistral_ext: cannot let a kernel use " + std::to_string(bytes) +
                             " bytes of shared memory: " + cudaGetErrorString(error));
  }
  limits.dynamic_smem_opt_in = needed;
}

// Blocks of `kernel` that fit on one multiprocessor at once (at least 1), remembered per
// (kernel, device, threads, dynamic shared memory).
template <typename Kernel>
int max_blocks_per_sm(Kernel kernel, int threads, size_t dynamic_smem_bytes) {
  const int device = current_device();
  static auto& known = *new std::map<std::tuple<const void*, int, int, size_t>, int>;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, threads, dynamic_smem_bytes);
  std::lock_guard<std::mutex> lock(launch_query_mutex());
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  int blocks = 0;
  check_cuda_query(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, dynamic_smem_bytes),
                   "occupancy");
  return known.emplace(key, std::max(blocks, 1)).first->second;
}

// kernel<<<grid, block, smem_bytes, stream>>>(args...), allowed to overlap the previous kernel in
// the stream (see above) when overlap_previous is set and the code the device runs was built for
// compute capability 9.0+ (PTX for an older one, compiled on the fly for a Hopper, has no wait).
// A failed launch surfaces through check_launch; a failed query of the kernel's version throws.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, CudaStream stream,
                   bool overlap_previous, Args&&... args) {
  if (overlap_previous) overlap_previous = kernel_limits(kernel).ptx_version >= 90;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = overlap_previous ? 1 : 0;
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// Call right after a launch: a bad configuration surfaces here, not at the next sync.
inline void check_launch(const char* op) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess)
    throw std::runtime_error(std::string("mistral_ext: ") + op + " CUDA launch failed: " + cudaGetErrorString(error));
}

inline constexpr int64_t kMaxGridX = 2147483647;  // blocks along gridDim.x

}  // namespace mistral_ext
