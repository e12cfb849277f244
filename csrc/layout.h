// Output layout rule shared by every op's CPU and CUDA host code.
#pragma once

#include <ATen/ATen.h>

namespace aim_kernels {

// An op's output takes its main input's layout: channels_last only when the input is
// channels_last-dense and not also plain-contiguous. aim_kernels/_library.py
// memory_format_of is the same rule, so fake and real outputs have the same strides.
inline at::MemoryFormat output_memory_format(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

}  // namespace aim_kernels
