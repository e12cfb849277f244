// masked_conv2d on CPU: topdown_merge(conv2d(x, weight, bias), mask, prev) with the
// convolution evaluated only at output positions where mask != 0.
//
// 1. Compact: one pass over the mask lists the active positions (n * Ho * Wo + pixel).
// 2. Per chunk of active positions (at::parallel_for over chunks, scratch per thread, the
//    column matrix sized for L2): im2col of only those positions, one GEMM through ATen
//    (at::addmm_out, i.e. MKL). NCHW gathers the transposed column matrix (K x rows: each
//    row of it reads one input plane) and the GEMM gives (C_out x rows); channels_last
//    gathers (rows x K) with K = (ky, kx, c), contiguous runs of channels, and the GEMM gives
//    (rows x C_out). Depthwise convolutions (no reduction over channels: no GEMM) are
//    computed directly.
// 3. Scatter fused with the merge: each chunk writes its range of output positions once,
//    nearest-upsampled prev (or 0) by the index rules topdown_merge uses (csrc/index_rules.h),
//    plus conv * mask at the active positions, rounded like topdown_merge: T(conv * m + p).
//    Inactive positions are thus bit-identical to the upsampled prev.
// Above dense_crossover_density the dense composition runs instead.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../index_rules.h"
#include "../masked_conv2d.h"

namespace aim_kernels {
namespace {

// Rows per chunk: 64..256 rows, where MKL's sgemm runs at 190-225 GFLOPS on one core for
// K = 384..3456 (32 rows: 140-200) on the Xeon (2 MB L2), and the column matrix within
// kColumnBytes. 4 MB: on the AMD EPYC (Zen 3, AVX2, 512 KB L2: no chunk of 64+ rows at K = 3456
// fits it either way) sgemm at (rows x 3456) x (3456 x 256) ran at 58 GFLOPS with 144 rows, 71
// with 256 (the 2 MB bound gave 144); AIM_KERNELS_MASKED_CONV_COLUMN_BYTES overrides it, for
// benchmarks/bench_masked_conv2d.py to compare settings in one process.
constexpr int64_t kColumnBytes = 4 << 20;
constexpr int64_t kMinRows = 64, kMaxRows = 256;

int64_t column_bytes() {
  const char* forced = std::getenv("AIM_KERNELS_MASKED_CONV_COLUMN_BYTES");
  return forced ? std::max<int64_t>(1, std::atoll(forced)) : kColumnBytes;
}

int64_t rows_per_chunk(int64_t K, int64_t elem_size, int64_t active) {
  int64_t rows = column_bytes() / std::max<int64_t>(1, K * elem_size);
  rows = std::clamp<int64_t>(rows / 16 * 16, kMinRows, kMaxRows);
  // at least two chunks per thread when there is enough work, so threads finish together
  const int64_t balanced = (active + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  return std::max<int64_t>(kMinRows, std::min(rows, (balanced + 15) / 16 * 16));
}

std::vector<int64_t> active_positions(const at::Tensor& mask) {
  std::vector<int64_t> active;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask.scalar_type(), "masked_conv2d_compact", [&] {
    const scalar_t* m = mask.const_data_ptr<scalar_t>();
    const int64_t total = mask.numel();
    active.reserve(total);
    for (int64_t i = 0; i < total; ++i) {
      if (m[i] != scalar_t(0)) active.push_back(i);  // NaN is active, as conv * NaN is NaN in the dense result
    }
  });
  return active;
}

std::vector<int64_t> source_table(int64_t in, int64_t out) {
  std::vector<int64_t> src(out);
  for (int64_t d = 0; d < out; ++d) src[d] = nearest_source_index(d, in, out);
  return src;
}

// Where active position `pos` (n * Ho * Wo + pixel) reads its receptive field from.
struct Origin {
  int64_t n, pixel, iy, ix;  // iy, ix: input coordinates of tap (0, 0); may be outside
};

inline Origin origin_of(int64_t pos, const ConvGeometry& g) {
  const int64_t HoWo = g.Ho * g.Wo;
  const int64_t n = pos / HoWo, pixel = pos % HoWo;
  const int64_t oy = pixel / g.Wo, ox = pixel % g.Wo;
  return Origin{n, pixel, oy * g.sh - g.ph, ox * g.sw - g.pw};
}

inline bool inside(int64_t v, int64_t size) { return static_cast<uint64_t>(v) < static_cast<uint64_t>(size); }

// NCHW: per tap and row, the offset of that tap in channel 0 of the input, or -1 outside (padding).
void nchw_tap_offsets(int64_t* tap_offsets, const Origin* o, int64_t rows, const ConvGeometry& g) {
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    for (int64_t kx = 0; kx < g.kw; ++kx, tap_offsets += rows) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t iy = o[r].iy + ky * g.dh, ix = o[r].ix + kx * g.dw;
        tap_offsets[r] = inside(iy, g.H) && inside(ix, g.W) ? (o[r].n * g.C * g.H + iy) * g.W + ix : -1;
      }
    }
  }
}

// NCHW: cols (K x rows), K = (c, ky, kx) like weight.reshape(C_out, K).
template <typename T>
void gather_columns_nchw(T* cols, const T* x, const int64_t* tap_offsets, int64_t rows, const ConvGeometry& g) {
  const int64_t HW = g.H * g.W, taps = g.taps();
  T* dst = cols;
  for (int64_t c = 0; c < g.C; ++c) {
    const T* plane = x + c * HW;
    for (int64_t t = 0; t < taps; ++t, dst += rows) {
      const int64_t* off = tap_offsets + t * rows;
      for (int64_t r = 0; r < rows; ++r) dst[r] = off[r] >= 0 ? plane[off[r]] : T(0);
    }
  }
}

// channels_last: cols (rows x K), K = (ky, kx, c) like weight in channels_last order.
template <typename T>
void gather_columns_nhwc(T* cols, const T* x, const Origin* o, int64_t rows, const ConvGeometry& g) {
  const int64_t K = g.taps() * g.C;
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = cols + r * K;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = o[r].iy + ky * g.dh;
      for (int64_t kx = 0; kx < g.kw; ++kx, dst += g.C) {
        const int64_t ix = o[r].ix + kx * g.dw;
        if (inside(iy, g.H) && inside(ix, g.W)) {
          std::memcpy(dst, x + ((o[r].n * g.H + iy) * g.W + ix) * g.C, g.C * sizeof(T));
        } else {
          std::fill(dst, dst + g.C, T(0));
        }
      }
    }
  }
}

// acc[c] += x[c] * w[c], float: cloned for AVX-512 and AVX2 (the build's baseline is SSE2).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void multiply_add(float* __restrict__ acc, const float* __restrict__ x, const float* __restrict__ w, int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] += x[c] * w[c];
}

template <typename T, typename acc_t>
inline void multiply_add(acc_t* acc, const T* x, const acc_t* w, int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] += acc_t(x[c]) * w[c];
}

// Depthwise (no reduction over channels, so no GEMM): conv = T(sum over taps of x * w + bias),
// accumulated in acc_t like the dense convolution. w in acc_t: (c, tap) for NCHW, where each
// kernel row reads a contiguous run of an input row; (tap, c) for channels_last, where each tap
// reads a contiguous run of channels. conv: NCHW (C x rows), channels_last (rows x C).
template <typename T, typename acc_t>
void depthwise_rows(T* conv, const T* x, const acc_t* w, const acc_t* bias, const Origin* o, int64_t rows,
                    const ConvGeometry& g, bool channels_last, acc_t* acc) {
  const int64_t C = g.C, HW = g.H * g.W;
  if (!channels_last) {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* wc = w + c * g.taps();
      for (int64_t r = 0; r < rows; ++r) {
        const T* plane = x + (o[r].n * C + c) * HW;
        acc_t sum = bias[c];
        for (int64_t ky = 0; ky < g.kh; ++ky) {
          const int64_t iy = o[r].iy + ky * g.dh;
          if (!inside(iy, g.H)) continue;
          const T* row = plane + iy * g.W;
          const acc_t* wr = wc + ky * g.kw;
          for (int64_t kx = 0; kx < g.kw; ++kx) {
            const int64_t ix = o[r].ix + kx * g.dw;
            if (inside(ix, g.W)) sum += acc_t(row[ix]) * wr[kx];
          }
        }
        conv[c * rows + r] = T(sum);
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(bias, bias + C, acc);
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = o[r].iy + ky * g.dh;
      if (!inside(iy, g.H)) continue;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t ix = o[r].ix + kx * g.dw;
        if (inside(ix, g.W)) multiply_add(acc, x + ((o[r].n * g.H + iy) * g.W + ix) * C, w + (ky * g.kw + kx) * C, C);
      }
    }
    for (int64_t c = 0; c < C; ++c) conv[r * C + c] = T(acc[c]);
  }
}

// Writes output positions [begin, end) (n * Ho * Wo + pixel) of every channel exactly once:
// the nearest-upsampled prev (or 0), and at the chunk's active rows conv * mask + that, rounded
// like topdown_merge: T(conv * m + p). conv is (rows x C_out) channels_last, (C_out x rows) NCHW.
template <typename T>
struct RangeWriter {
  using acc_t = at::opmath_type<T>;
  const ConvGeometry& g;
  T* out;
  const T* prev;  // nullptr: no prev
  const T* mask;
  std::vector<int64_t> sy, sx;  // index rules of csrc/index_rules.h as tables
  bool halve_columns;           // the column rule is x / 2 exactly (FPN's x2)

  RangeWriter(const ConvGeometry& g, T* out, const T* prev, const T* mask)
      : g(g), out(out), prev(prev), mask(mask), sy(source_table(g.hs, g.Ho)), sx(source_table(g.ws, g.Wo)),
        halve_columns(g.Wo == 2 * g.ws) {}

  void channels_last(int64_t begin, int64_t end, const int64_t* active, int64_t rows, const T* conv) const {
    const int64_t HoWo = g.Ho * g.Wo, Cout = g.Cout;
    int64_t j = 0;
    for (int64_t pos = begin; pos < end; ++pos) {
      T* o = out + pos * Cout;
      const T* p = nullptr;
      if (prev) {
        const int64_t n = pos / HoWo, pixel = pos % HoWo;
        p = prev + ((n * g.hs + sy[pixel / g.Wo]) * g.ws + sx[pixel % g.Wo]) * Cout;
      }
      if (j < rows && active[j] == pos) {
        const acc_t m = acc_t(mask[pos]);
        const T* v = conv + j * Cout;
        if (p) {
          for (int64_t co = 0; co < Cout; ++co) o[co] = T(acc_t(v[co]) * m + acc_t(p[co]));
        } else {
          for (int64_t co = 0; co < Cout; ++co) o[co] = T(acc_t(v[co]) * m);
        }
        ++j;
      } else if (p) {
        std::memcpy(o, p, Cout * sizeof(T));
      } else {
        std::fill(o, o + Cout, T(0));
      }
    }
  }

  // NCHW, one image's pixels [pixel_begin, pixel_end) with its active rows [j0, j1) of the chunk:
  // per channel, the plane segment is filled (it stays in L1), then the active pixels merged.
  void nchw_image(int64_t n, int64_t pixel_begin, int64_t pixel_end, const int64_t* active, const Origin* origins,
                  int64_t j0, int64_t j1, int64_t rows, const T* conv) const {
    const int64_t HoWo = g.Ho * g.Wo;
    for (int64_t co = 0; co < g.Cout; ++co) {
      T* plane = out + (n * g.Cout + co) * HoWo;
      if (prev) {
        const T* prev_plane = prev + (n * g.Cout + co) * g.hs * g.ws;
        int64_t y = pixel_begin / g.Wo, x0 = pixel_begin % g.Wo;
        for (int64_t pixel = pixel_begin; pixel < pixel_end; ++y, x0 = 0) {
          const int64_t x1 = std::min(g.Wo, x0 + pixel_end - pixel);
          const T* p = prev_plane + sy[y] * g.ws;
          T* o = plane + y * g.Wo;
          if (halve_columns && x0 == 0 && x1 == g.Wo) {  // FPN's x2, whole row: no index lookups
            for (int64_t s = 0; s < g.ws; ++s) o[2 * s] = o[2 * s + 1] = p[s];
          } else {
            for (int64_t x = x0; x < x1; ++x) o[x] = p[sx[x]];
          }
          pixel += x1 - x0;
        }
      } else {
        std::fill(plane + pixel_begin, plane + pixel_end, T(0));
      }
      const T* v = conv + co * rows;
      for (int64_t j = j0; j < j1; ++j) {
        T* o = plane + origins[j].pixel;
        *o = T(acc_t(v[j]) * acc_t(mask[active[j]]) + acc_t(*o));
      }
    }
  }

  void nchw(int64_t begin, int64_t end, const int64_t* active, const Origin* origins, int64_t rows, const T* conv) const {
    const int64_t HoWo = g.Ho * g.Wo;
    int64_t j = 0;
    while (begin < end) {
      const int64_t n = begin / HoWo, image_end = std::min(end, (n + 1) * HoWo);
      const int64_t j0 = j;
      while (j < rows && active[j] < image_end) ++j;
      nchw_image(n, begin - n * HoWo, image_end - n * HoWo, active, origins, j0, j, rows, conv);
      begin = image_end;
    }
  }
};

// Chunks of `rows_max` active positions; chunk c writes the output positions from its first
// active position to the next chunk's (the first chunk from 0, the last to the end), so every
// output position has exactly one writer and inactive ones get the upsampled prev on the way.
template <typename T>
void masked_conv2d_sparse(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& mask, const std::optional<at::Tensor>& prev, const std::vector<int64_t>& active,
                          const ConvGeometry& g, bool channels_last) {
  using acc_t = at::opmath_type<T>;
  const int64_t K = g.depthwise ? g.taps() : g.taps() * g.C, total = static_cast<int64_t>(active.size());
  const int64_t rows_max = rows_per_chunk(K, sizeof(T), total);
  const int64_t chunks = std::max<int64_t>(1, (total + rows_max - 1) / rows_max);
  // GEMM: NCHW multiplies (C_out x K) by the gathered (K x rows); channels_last (rows x K) by
  // the transpose of weight in channels_last order (C_out x K, a view when weight already is
  // channels_last; the copy otherwise costs 0.4 ms at 256x384x3x3, a permute to (K x C_out) 3.9 ms).
  // Depthwise: weights in acc_t (see depthwise_rows).
  at::Tensor w;
  std::vector<acc_t> depthwise_bias;
  if (g.depthwise) {
    const at::Tensor per_channel = weight.reshape({g.C, g.taps()});
    w = (channels_last ? per_channel.t() : per_channel).contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
    depthwise_bias.assign(g.C, acc_t(0));
    if (bias.has_value()) {
      const at::Tensor b = bias->contiguous();
      for (int64_t c = 0; c < g.C; ++c) depthwise_bias[c] = acc_t(b.const_data_ptr<T>()[c]);
    }
  } else {
    w = channels_last ? weight.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({g.Cout, K}).t()
                      : weight.reshape({g.Cout, K});
  }
  const at::Tensor nchw_bias = bias.has_value() ? bias->unsqueeze(1) : at::Tensor();
  const RangeWriter<T> writer(g, out.mutable_data_ptr<T>(), g.has_prev ? prev->const_data_ptr<T>() : nullptr,
                              mask.const_data_ptr<T>());
  const T* xp = x.const_data_ptr<T>();
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    at::Tensor cols = at::empty({g.depthwise ? 0 : rows_max * K}, x.options());
    at::Tensor conv = at::empty({rows_max * g.Cout}, x.options());
    std::vector<Origin> origins(rows_max);
    std::vector<int64_t> tap_offsets(channels_last || g.depthwise ? 0 : rows_max * g.taps());
    std::vector<acc_t> acc(g.depthwise ? g.C : 0);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t first = chunk * rows_max, rows = std::min(rows_max, total - first);
      const int64_t begin = chunk == 0 ? 0 : active[first];
      const int64_t end = chunk == chunks - 1 ? g.positions() : active[first + rows];
      const int64_t* chunk_active = active.data() + first;
      for (int64_t r = 0; r < rows; ++r) origins[r] = origin_of(chunk_active[r], g);
      if (rows > 0 && g.depthwise) {
        depthwise_rows<T, acc_t>(conv.mutable_data_ptr<T>(), xp, w.const_data_ptr<acc_t>(), depthwise_bias.data(),
                                 origins.data(), rows, g, channels_last, acc.data());
      } else if (rows > 0 && channels_last) {
        gather_columns_nhwc(cols.mutable_data_ptr<T>(), xp, origins.data(), rows, g);
        at::Tensor res = conv.narrow(0, 0, rows * g.Cout).view({rows, g.Cout});
        const at::Tensor c = cols.narrow(0, 0, rows * K).view({rows, K});
        if (bias.has_value()) at::addmm_out(res, *bias, c, w); else at::mm_out(res, c, w);
      } else if (rows > 0) {
        nchw_tap_offsets(tap_offsets.data(), origins.data(), rows, g);
        gather_columns_nchw(cols.mutable_data_ptr<T>(), xp, tap_offsets.data(), rows, g);
        at::Tensor res = conv.narrow(0, 0, g.Cout * rows).view({g.Cout, rows});
        const at::Tensor c = cols.narrow(0, 0, K * rows).view({K, rows});
        if (bias.has_value()) at::addmm_out(res, nchw_bias, w, c); else at::mm_out(res, w, c);
      }
      if (channels_last) {
        writer.channels_last(begin, end, chunk_active, rows, conv.const_data_ptr<T>());
      } else {
        writer.nchw(begin, end, chunk_active, origins.data(), rows, conv.const_data_ptr<T>());
      }
    }
  });
}

at::Tensor masked_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
                             const at::Tensor& mask_in, const std::optional<at::Tensor>& prev_in, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g = conv_geometry(x_in, weight_in, bias, mask_in, prev_in, stride, padding, dilation, groups);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside are not recorded
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor mask = mask_in.contiguous();  // (N, 1, Ho, Wo): the same order in both layouts
  const std::vector<int64_t> active = active_positions(mask);
  if (static_cast<double>(active.size()) > dense_crossover_density(g, channels_last, false) * static_cast<double>(g.positions())) {
    return masked_conv2d_dense(x_in, weight_in, bias, mask_in, prev_in, stride, padding, dilation, groups);
  }
  const at::Tensor x = x_in.contiguous(fmt);
  const std::optional<at::Tensor> prev = g.has_prev ? std::optional<at::Tensor>(prev_in->contiguous(fmt)) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_cpu", [&] {
    masked_conv2d_sparse<scalar_t>(out, x, weight_in, bias, mask, prev, active, g, channels_last);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aim_kernels, CPU, m) { m.impl("masked_conv2d", &masked_conv2d_cpu); }

}  // namespace aim_kernels
