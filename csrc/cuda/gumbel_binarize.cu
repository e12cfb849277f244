// gumbel_binarize on CUDA: one thread per Philox block (4 consecutive stream positions, so
// every generated word is used), grid-stride. The seed is read from device memory, so a
// seed drawn on the GPU (seed=None) needs no host sync and the launch is graph-capturable.
// Bit-exact agreement with the CPU kernel comes from csrc/philox.h (see its header).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../gumbel_binarize.h"
#include "../philox.h"

namespace aim_kernels {
namespace {

constexpr int kThreads = 256;

// The four stream words of block b, or zeros in evaluation (noise 0: x + 0 >= 0 is x >= 0).
__device__ __forceinline__ void block_noise(bool training, uint64_t seed, uint64_t block, float noise[4]) {
  if (!training) {
    noise[0] = noise[1] = noise[2] = noise[3] = 0.0f;
    return;
  }
  const philox::Words w = philox::stream_block(seed, block);
  noise[0] = philox::logistic_noise(w.w0);
  noise[1] = philox::logistic_noise(w.w1);
  noise[2] = philox::logistic_noise(w.w2);
  noise[3] = philox::logistic_noise(w.w3);
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t numel, const int64_t* seed_ptr,
                               bool training, uint64_t first_block, int64_t lead, int64_t blocks) {
  using acc_t = at::opmath_type<T>;
  const uint64_t seed = training ? static_cast<uint64_t>(*seed_ptr) : 0;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < blocks; b += int64_t(gridDim.x) * blockDim.x) {
    float noise[4];
    block_noise(training, seed, first_block + static_cast<uint64_t>(b), noise);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t j = 4 * b + lane - lead;
      if (j >= 0 && j < numel) y[j] = T(acc_t(x[j]) + acc_t(noise[lane]) >= acc_t(0) ? 1 : 0);
    }
  }
}

template <typename T>
__device__ __forceinline__ T st_grad(T g, T x, float noise, float t) {
  const float z = philox::div(philox::add(float(x), noise), t);
  return T(philox::div(philox::mul(float(g), philox::logistic_derivative(z)), t));
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ y, int64_t numel,
                                const int64_t* seed_ptr, bool training, double temperature, uint64_t first_block,
                                int64_t lead, int64_t blocks) {
  const uint64_t seed = training ? static_cast<uint64_t>(*seed_ptr) : 0;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < blocks; b += int64_t(gridDim.x) * blockDim.x) {
    float noise[4];
    block_noise(training, seed, first_block + static_cast<uint64_t>(b), noise);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t j = 4 * b + lane - lead;
      if (j < 0 || j >= numel) continue;
      if constexpr (std::is_same_v<T, double>) {
        const double z = (x[j] + double(noise[lane])) / temperature;
        y[j] = g[j] * philox::logistic_derivative(z) / temperature;
      } else {
        y[j] = st_grad<T>(g[j], x[j], noise[lane], static_cast<float>(temperature));
      }
    }
  }
}

// Stream blocks a call covers; in evaluation the elements are simply grouped by four.
StreamRange launch_range(bool training, int64_t offset, int64_t numel) {
  return training ? stream_range(offset, numel) : StreamRange{0, 0, (numel + 3) / 4};
}

unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(std::min<int64_t>((blocks + kThreads - 1) / kThreads, int64_t(1) << 16));
}

const int64_t* seed_pointer(bool training, const std::optional<at::Tensor>& seed) {
  return training ? seed->const_data_ptr<int64_t>() : nullptr;
}

at::Tensor gumbel_binarize_cuda(const at::Tensor& logits_in, double temperature, bool training,
                                const std::optional<at::Tensor>& seed, int64_t offset) {
  check_gumbel_inputs("gumbel_binarize", logits_in, temperature, training, seed, offset);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto fmt = output_memory_format(logits_in);
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  const int64_t numel = logits.numel();
  if (numel > 0) {
    const StreamRange range = launch_range(training, offset, numel);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gumbel_binarize_cuda", [&] {
      forward_kernel<scalar_t><<<grid_for(range.blocks), kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), numel, seed_pointer(training, seed),
          training, range.first_block, range.lead, range.blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return fmt == at::MemoryFormat::Contiguous ? out : out.contiguous(fmt);
}

at::Tensor gumbel_binarize_backward_cuda(const at::Tensor& grad_in, const at::Tensor& logits_in, double temperature,
                                         bool training, const std::optional<at::Tensor>& seed, int64_t offset) {
  check_gumbel_inputs("gumbel_binarize_backward", logits_in, temperature, training, seed, offset);
  TORCH_CHECK(grad_in.sizes() == logits_in.sizes(), "gumbel_binarize_backward: grad_out ", grad_in.sizes(),
              " must match logits ", logits_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == logits_in.scalar_type() && grad_in.device() == logits_in.device(),
              "gumbel_binarize_backward: grad_out must have logits' dtype and device");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto fmt = output_memory_format(logits_in);
  const at::Tensor logits = logits_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  const int64_t numel = logits.numel();
  if (numel > 0) {
    const StreamRange range = launch_range(training, offset, numel);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gumbel_binarize_backward_cuda", [&] {
      backward_kernel<scalar_t><<<grid_for(range.blocks), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), logits.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), numel,
          seed_pointer(training, seed), training, temperature, range.first_block, range.lead, range.blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return fmt == at::MemoryFormat::Contiguous ? out : out.contiguous(fmt);
}

}  // namespace

TORCH_LIBRARY_IMPL(aim_kernels, CUDA, m) {
  m.impl("gumbel_binarize", &gumbel_binarize_cuda);
  m.impl("gumbel_binarize_backward", &gumbel_binarize_backward_cuda);
}

}  // namespace aim_kernels
