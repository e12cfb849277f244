// topdown_merge on CPU: out = feat * mask + nearest_upsample(prev), and its backward.
//
// One pass over memory each way. The nearest rule is turned into per-axis tables once per
// call, and rows whose rule is dst / k (every FPN x2) take a loop with no index lookups.
// Backward tasks own whole source rows of one image across all channels, so grad_prev
// (a gather over each source pixel's footprint) and the channel-summed grad_mask each
// have exactly one writer: no atomics, and a fixed summation order.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../index_rules.h"
#include "../topdown_merge.h"

namespace aim_kernels {
namespace {

// The nearest rule along one axis as tables.
struct AxisMap {
  std::vector<int64_t> src;    // source index of each destination (size out)
  std::vector<int64_t> begin;  // footprint start of each source (size in + 1)
  int64_t ratio = 0;           // k when src[d] == d / k for every d, else 0
};

AxisMap make_axis_map(int64_t in, int64_t out) {
  AxisMap a;
  a.src.resize(out);
  a.begin.resize(in + 1);
  for (int64_t d = 0; d < out; ++d) a.src[d] = nearest_source_index(d, in, out);
  for (int64_t s = 0; s <= in; ++s) a.begin[s] = footprint_begin(s, in, out);
  if (in > 0 && out % in == 0) {
    const int64_t k = out / in;
    bool exact = true;
    for (int64_t d = 0; d < out && exact; ++d) exact = a.src[d] == d / k;
    a.ratio = exact ? k : 0;
  }
  return a;
}

// One output row, NCHW: o[x] = f[x] * m[x] + p[src(x)]; p == nullptr means no prev.
template <typename T>
inline void merge_row(T* o, const T* f, const T* m, const T* p, int64_t W, const AxisMap& xs) {
  using acc_t = at::opmath_type<T>;
  if (p == nullptr) {
    for (int64_t x = 0; x < W; ++x) o[x] = T(acc_t(f[x]) * acc_t(m[x]));
    return;
  }
  const int64_t k = xs.ratio;
  if (k == 1) {
    for (int64_t x = 0; x < W; ++x) o[x] = T(acc_t(f[x]) * acc_t(m[x]) + acc_t(p[x]));
  } else if (k == 2) {
    for (int64_t j = 0; j < W / 2; ++j) {
      const acc_t pv = acc_t(p[j]);
      o[2 * j] = T(acc_t(f[2 * j]) * acc_t(m[2 * j]) + pv);
      o[2 * j + 1] = T(acc_t(f[2 * j + 1]) * acc_t(m[2 * j + 1]) + pv);
    }
  } else if (k > 2) {
    for (int64_t j = 0; j < W / k; ++j) {
      const acc_t pv = acc_t(p[j]);
      for (int64_t t = j * k; t < (j + 1) * k; ++t) o[t] = T(acc_t(f[t]) * acc_t(m[t]) + pv);
    }
  } else {
    const int64_t* src = xs.src.data();
    for (int64_t x = 0; x < W; ++x) o[x] = T(acc_t(f[x]) * acc_t(m[x]) + acc_t(p[src[x]]));
  }
}

// acc[s] += sum of g over the footprint of source column s, for one output row.
template <typename T, typename acc_t>
inline void gather_row(acc_t* acc, const T* g, int64_t w, const AxisMap& xs) {
  const int64_t k = xs.ratio;
  if (k == 1) {
    for (int64_t j = 0; j < w; ++j) acc[j] += acc_t(g[j]);
  } else if (k == 2) {
    for (int64_t j = 0; j < w; ++j) acc[j] += acc_t(g[2 * j]) + acc_t(g[2 * j + 1]);
  } else {
    const int64_t* begin = xs.begin.data();
    for (int64_t j = 0; j < w; ++j) {
      acc_t s = 0;
      for (int64_t x = begin[j]; x < begin[j + 1]; ++x) s += acc_t(g[x]);
      acc[j] += s;
    }
  }
}

template <typename T>
void forward_nchw(T* out, const T* feat, const T* mask, const T* prev, int64_t N, int64_t C, int64_t H, int64_t W,
                  int64_t h, int64_t w, bool mask_full, const AxisMap& ys, const AxisMap& xs) {
  const int64_t rows = N * C * H;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(W, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // Row r is row y of plane (n, c); stepped, not divided out per row: at FPN's 14x14 and
    // 7x7 stages two 64-bit divisions cost more than the row itself.
    int64_t plane = begin / H, y = begin % H, c = plane % C, n = plane / C;
    for (int64_t r = begin; r < end; ++r) {
      const T* m = mask + ((mask_full ? plane : n) * H + y) * W;
      const T* p = prev ? prev + (plane * h + ys.src[y]) * w : nullptr;
      merge_row(out + r * W, feat + r * W, m, p, W, xs);
      if (++y == H) {
        y = 0, ++plane;
        if (++c == C) c = 0, ++n;
      }
    }
  });
}

template <typename T>
void forward_nhwc(T* out, const T* feat, const T* mask, const T* prev, int64_t N, int64_t C, int64_t H, int64_t W,
                  int64_t h, int64_t w, bool mask_full, const AxisMap& ys, const AxisMap& xs) {
  using acc_t = at::opmath_type<T>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(W * C, 1));
  at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / H, y = r % H;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t pix = r * W + x;
        const T* f = feat + pix * C;
        T* o = out + pix * C;
        const T* p = prev ? prev + ((n * h + ys.src[y]) * w + xs.src[x]) * C : nullptr;
        if (mask_full) {
          const T* m = mask + pix * C;
          if (p) {
            for (int64_t c = 0; c < C; ++c) o[c] = T(acc_t(f[c]) * acc_t(m[c]) + acc_t(p[c]));
          } else {
            for (int64_t c = 0; c < C; ++c) o[c] = T(acc_t(f[c]) * acc_t(m[c]));
          }
        } else {
          const acc_t mv = acc_t(mask[pix]);
          if (p) {
            for (int64_t c = 0; c < C; ++c) o[c] = T(acc_t(f[c]) * mv + acc_t(p[c]));
          } else {
            for (int64_t c = 0; c < C; ++c) o[c] = T(acc_t(f[c]) * mv);
          }
        }
      }
    }
  });
}

// Source rows per backward task: enough that a task's broadcast grad_mask accumulator
// (its output rows x W) stays around 16 KB, at least one.
int64_t source_rows_per_task(int64_t H, int64_t W, int64_t hs) {
  const int64_t rows_per_source = (H + hs - 1) / std::max<int64_t>(hs, 1);
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(W * rows_per_source, 1));
}

// Backward, NCHW. Without prev, "source rows" are the output rows themselves (identity maps).
template <typename T>
void backward_nchw(const T* g, const T* feat, const T* mask, T* gfeat, T* gmask, T* gprev, int64_t N, int64_t C,
                   int64_t H, int64_t W, int64_t hs, int64_t ws, bool mask_full, bool has_prev, const AxisMap& ys,
                   const AxisMap& xs) {
  using acc_t = at::opmath_type<T>;
  const int64_t chunk = source_rows_per_task(H, W, hs);
  const int64_t chunks = (hs + chunk - 1) / chunk;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gmask_acc, gprev_acc(has_prev ? ws : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks;
      const int64_t s0 = (task % chunks) * chunk, s1 = std::min(hs, s0 + chunk);
      const int64_t y0 = ys.begin[s0], y1 = ys.begin[s1];
      if (gmask && !mask_full) gmask_acc.assign((y1 - y0) * W, acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const int64_t plane = n * C + c;
        for (int64_t s = s0; s < s1; ++s) {
          if (has_prev) std::fill(gprev_acc.begin(), gprev_acc.end(), acc_t(0));
          for (int64_t y = ys.begin[s]; y < ys.begin[s + 1]; ++y) {
            const int64_t off = (plane * H + y) * W;
            const int64_t moff = ((mask_full ? plane : n) * H + y) * W;
            const T* gr = g + off;
            const T* fr = gmask ? feat + off : nullptr;  // feat and mask are null when their gradient is not asked for
            const T* mr = gfeat ? mask + moff : nullptr;
            T* gfr = gfeat ? gfeat + off : nullptr;
            if (mask_full) {
              T* gmr = gmask ? gmask + moff : nullptr;
              if (gfr && gmr) {
                for (int64_t x = 0; x < W; ++x) {
                  const acc_t gv = acc_t(gr[x]);
                  gfr[x] = T(gv * acc_t(mr[x]));
                  gmr[x] = T(gv * acc_t(fr[x]));
                }
              } else if (gfr) {
                for (int64_t x = 0; x < W; ++x) gfr[x] = T(acc_t(gr[x]) * acc_t(mr[x]));
              } else if (gmr) {
                for (int64_t x = 0; x < W; ++x) gmr[x] = T(acc_t(gr[x]) * acc_t(fr[x]));
              }
            } else {
              acc_t* gma = gmask ? gmask_acc.data() + (y - y0) * W : nullptr;
              if (gfr && gma) {
                for (int64_t x = 0; x < W; ++x) {
                  const acc_t gv = acc_t(gr[x]);
                  gfr[x] = T(gv * acc_t(mr[x]));
                  gma[x] += gv * acc_t(fr[x]);
                }
              } else if (gfr) {
                for (int64_t x = 0; x < W; ++x) gfr[x] = T(acc_t(gr[x]) * acc_t(mr[x]));
              } else if (gma) {
                for (int64_t x = 0; x < W; ++x) gma[x] += acc_t(gr[x]) * acc_t(fr[x]);
              }
            }
            if (has_prev) gather_row(gprev_acc.data(), gr, ws, xs);
          }
          if (has_prev) {
            T* gpr = gprev + (plane * hs + s) * ws;
            for (int64_t j = 0; j < ws; ++j) gpr[j] = T(gprev_acc[j]);
          }
        }
      }
      if (gmask && !mask_full) {
        T* gmr = gmask + (n * H + y0) * W;
        for (int64_t i = 0; i < (y1 - y0) * W; ++i) gmr[i] = T(gmask_acc[i]);
      }
    }
  });
}

// Backward, NHWC: each task walks source pixels and their footprints; channels innermost.
template <typename T>
void backward_nhwc(const T* g, const T* feat, const T* mask, T* gfeat, T* gmask, T* gprev, int64_t N, int64_t C,
                   int64_t H, int64_t W, int64_t hs, int64_t ws, bool mask_full, bool has_prev, const AxisMap& ys,
                   const AxisMap& xs) {
  using acc_t = at::opmath_type<T>;
  const int64_t chunk = std::max<int64_t>(1, source_rows_per_task(H, W, hs) / std::max<int64_t>(C, 1));
  const int64_t chunks = (hs + chunk - 1) / chunk;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gprev_acc(has_prev ? C : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks;
      const int64_t s0 = (task % chunks) * chunk, s1 = std::min(hs, s0 + chunk);
      for (int64_t sy = s0; sy < s1; ++sy) {
        for (int64_t sx = 0; sx < ws; ++sx) {
          if (has_prev) std::fill(gprev_acc.begin(), gprev_acc.end(), acc_t(0));
          acc_t* gpa = gprev_acc.data();
          for (int64_t y = ys.begin[sy]; y < ys.begin[sy + 1]; ++y) {
            for (int64_t x = xs.begin[sx]; x < xs.begin[sx + 1]; ++x) {
              const int64_t pix = (n * H + y) * W + x;
              const T* gr = g + pix * C;
              if (gfeat && gmask) {  // both: one pass over the pixel's channels
                const T* fr = feat + pix * C;
                T* gfr = gfeat + pix * C;
                if (mask_full) {
                  const T* mr = mask + pix * C;
                  T* gmr = gmask + pix * C;
                  for (int64_t c = 0; c < C; ++c) {
                    const acc_t gv = acc_t(gr[c]);
                    gfr[c] = T(gv * acc_t(mr[c]));
                    gmr[c] = T(gv * acc_t(fr[c]));
                  }
                } else {
                  const acc_t mv = acc_t(mask[pix]);
                  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
                  for (int64_t c = 0; c < C; ++c) {
                    const acc_t gv = acc_t(gr[c]);
                    gfr[c] = T(gv * mv);
                    sum += gv * acc_t(fr[c]);
                  }
                  gmask[pix] = T(sum);
                }
              } else if (gfeat) {
                T* gfr = gfeat + pix * C;
                if (mask_full) {
                  const T* mr = mask + pix * C;
                  for (int64_t c = 0; c < C; ++c) gfr[c] = T(acc_t(gr[c]) * acc_t(mr[c]));
                } else {
                  const acc_t mv = acc_t(mask[pix]);
                  for (int64_t c = 0; c < C; ++c) gfr[c] = T(acc_t(gr[c]) * mv);
                }
              } else if (gmask) {
                const T* fr = feat + pix * C;
                if (mask_full) {
                  T* gmr = gmask + pix * C;
                  for (int64_t c = 0; c < C; ++c) gmr[c] = T(acc_t(gr[c]) * acc_t(fr[c]));
                } else {
                  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
                  for (int64_t c = 0; c < C; ++c) sum += acc_t(gr[c]) * acc_t(fr[c]);
                  gmask[pix] = T(sum);
                }
              }
              if (has_prev) {
                for (int64_t c = 0; c < C; ++c) gpa[c] += acc_t(gr[c]);
              }
            }
          }
          if (has_prev) {
            T* gpr = gprev + ((n * hs + sy) * ws + sx) * C;
            for (int64_t c = 0; c < C; ++c) gpr[c] = T(gpa[c]);
          }
        }
      }
    }
  });
}

at::Tensor topdown_merge_cpu(const at::Tensor& feat, const at::Tensor& mask, const std::optional<at::Tensor>& prev) {
  const MergeForward f = prepare_merge_forward(feat, mask, prev);
  const MergeGeometry& g = f.geometry;
  if (f.out.numel() == 0) return f.out;
  const AxisMap ys = make_axis_map(g.hs, g.H), xs = make_axis_map(g.ws, g.W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.feat.scalar_type(), "topdown_merge_cpu", [&] {
    auto run = f.fmt == at::MemoryFormat::ChannelsLast ? forward_nhwc<scalar_t> : forward_nchw<scalar_t>;
    run(f.out.mutable_data_ptr<scalar_t>(), f.feat.const_data_ptr<scalar_t>(), f.mask.const_data_ptr<scalar_t>(),
        g.has_prev ? f.prev.const_data_ptr<scalar_t>() : nullptr, g.N, g.C, g.H, g.W, g.hs, g.ws, g.mask_full, ys, xs);
  });
  return f.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topdown_merge_backward_cpu(const at::Tensor& grad,
                                                                          const std::optional<at::Tensor>& feat,
                                                                          const std::optional<at::Tensor>& mask,
                                                                          int64_t mask_channels, at::IntArrayRef prev_size) {
  const MergeBackward b = prepare_merge_backward(grad, feat, mask, mask_channels, prev_size);
  const MergeGeometry& g = b.geometry;
  if (b.grad.numel() == 0) return {b.gfeat, b.gmask, b.gprev};
  const AxisMap ys = make_axis_map(g.hs, g.H), xs = make_axis_map(g.ws, g.W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.grad.scalar_type(), "topdown_merge_backward_cpu", [&] {
    auto run = b.fmt == at::MemoryFormat::ChannelsLast ? backward_nhwc<scalar_t> : backward_nchw<scalar_t>;
    // A gradient not asked for has a null output, and the input only it reads is null too.
    run(b.grad.const_data_ptr<scalar_t>(), b.want_mask_grad ? b.feat.const_data_ptr<scalar_t>() : nullptr,
        b.want_feat_grad ? b.mask.const_data_ptr<scalar_t>() : nullptr,
        b.want_feat_grad ? b.gfeat.mutable_data_ptr<scalar_t>() : nullptr,
        b.want_mask_grad ? b.gmask.mutable_data_ptr<scalar_t>() : nullptr,
        g.has_prev ? b.gprev.mutable_data_ptr<scalar_t>() : nullptr, g.N, g.C, g.H, g.W, g.hs, g.ws, g.mask_full,
        g.has_prev, ys, xs);
  });
  return {b.gfeat, b.gmask, b.gprev};
}

}  // namespace

TORCH_LIBRARY_IMPL(aim_kernels, CPU, m) {
  m.impl("topdown_merge", &topdown_merge_cpu);
  m.impl("topdown_merge_backward", &topdown_merge_backward_cpu);
}

}  // namespace aim_kernels
