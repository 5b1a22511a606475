// CPU kernels of the fused Hessian-vector product (see hvp.h, hvp_sweep.cpp):
//   engine::relu_rop, engine::relu_rop_backward, engine::softmax_xent_rop (C++ loops, OpenMP),
//   the NHWC im2col / col2im / pooling helpers of the im2col + GEMM path,
//   and the CPU registration of engine::hvp_sequential.
#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "hvp.h"

namespace engine_hvp {

namespace {

using at::Tensor;

// Rows per parallel task so that each task handles at least ~32k elements.
int64_t grain_for(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems)); }

void check_pair(const Tensor& pair, const char* name) {
  TORCH_CHECK(pair.dim() >= 1 && pair.size(0) % 2 == 0, name, ": expected a stacked pair (2B, ...), got ", pair.sizes());
  TORCH_CHECK(pair.scalar_type() == at::kFloat || pair.scalar_type() == at::kDouble, name,
              ": expected float32 or float64, got ", pair.scalar_type());
}

// ---- ReLU masks (in place) -----------------------------------------------------------------------

void relu_rop_cpu_(at::Tensor& pair) {
  check_pair(pair, "relu_rop_");
  TORCH_CHECK(pair.is_contiguous(), "relu_rop_: pair must be contiguous");
  const int64_t n = pair.numel() / 2;
  AT_DISPATCH_FLOATING_TYPES(pair.scalar_type(), "relu_rop_cpu_", [&] {
    scalar_t* a = pair.data_ptr<scalar_t>();
    scalar_t* ra = a + n;
    at::parallel_for(0, n, 32768, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t v = a[i];
        const bool on = v > scalar_t(0);
        a[i] = (on || v != v) ? v : scalar_t(0);  // relu keeps NaN, like at::relu
        ra[i] = on ? ra[i] : scalar_t(0);
      }
    });
  });
}

void relu_rop_backward_cpu_(const at::Tensor& out_primal, at::Tensor& grad_pair) {
  check_pair(grad_pair, "relu_rop_backward_");
  TORCH_CHECK(out_primal.numel() * 2 == grad_pair.numel() && out_primal.size(0) * 2 == grad_pair.size(0),
              "relu_rop_backward_: out_primal ", out_primal.sizes(), " must be the first half of grad_pair ",
              grad_pair.sizes());
  TORCH_CHECK(out_primal.scalar_type() == grad_pair.scalar_type(), "relu_rop_backward_: dtypes differ");
  TORCH_CHECK(grad_pair.is_contiguous(), "relu_rop_backward_: grad_pair must be contiguous");
  Tensor o = out_primal.contiguous();
  const int64_t n = o.numel();
  AT_DISPATCH_FLOATING_TYPES(grad_pair.scalar_type(), "relu_rop_backward_cpu_", [&] {
    const scalar_t* m = o.data_ptr<scalar_t>();
    scalar_t* g = grad_pair.data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const bool on = m[i] > scalar_t(0);
        g[i] = on ? g[i] : scalar_t(0);
        g[n + i] = on ? g[n + i] : scalar_t(0);
      }
    });
  });
}

// ---- softmax cross-entropy and its R-op -----------------------------------------------------------

std::tuple<Tensor, Tensor> softmax_xent_rop_cpu(const Tensor& logits_pair, const Tensor& y,
                                                const std::optional<Tensor>& weights) {
  check_pair(logits_pair, "softmax_xent_rop");
  TORCH_CHECK(logits_pair.dim() == 2, "softmax_xent_rop: logits_pair must be (2B, classes), got ", logits_pair.sizes());
  const int64_t B = logits_pair.size(0) / 2, K = logits_pair.size(1);
  TORCH_CHECK(K >= 1, "softmax_xent_rop: need at least one class");
  TORCH_CHECK(y.dim() == 1 && y.size(0) == B && y.scalar_type() == at::kLong, "softmax_xent_rop: y must be int64 (", B,
              ",), got ", y.scalar_type(), " ", y.sizes());
  Tensor z = logits_pair.contiguous(), yc = y.contiguous(), w;
  if (weights.has_value()) {
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == B && weights->scalar_type() == z.scalar_type(),
                "softmax_xent_rop: weights must be (", B, ",) with the logits' dtype");
    w = weights->contiguous();
  }
  const int64_t* yp = yc.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i)
    TORCH_CHECK(yp[i] >= 0 && yp[i] < K, "softmax_xent_rop: label y[", i, "] = ", yp[i], " is outside [0, ", K, ")");
  Tensor G = at::empty_like(z);
  Tensor row_loss = at::empty({B}, z.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "softmax_xent_rop_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;  // double for both float and double
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = G.data_ptr<scalar_t>();
    double* lp = row_loss.data_ptr<double>();
    const acc_t inv_b = acc_t(1) / acc_t(B);
    at::parallel_for(0, B, grain_for(4 * K), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* zr = zp + i * K;
        const scalar_t* rzr = zp + (B + i) * K;
        scalar_t* gr = gp + i * K;
        scalar_t* rgr = gp + (B + i) * K;
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t k = 0; k < K; ++k) m = std::max<acc_t>(m, zr[k]);
        acc_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += std::exp(acc_t(zr[k]) - m);
        const acc_t lse = m + std::log(s);
        const acc_t coef = (wp ? acc_t(wp[i]) : acc_t(1)) * inv_b;
        acc_t dot = 0;
        for (int64_t k = 0; k < K; ++k) dot += std::exp(acc_t(zr[k]) - lse) * acc_t(rzr[k]);
        for (int64_t k = 0; k < K; ++k) {
          const acc_t p = std::exp(acc_t(zr[k]) - lse);
          gr[k] = static_cast<scalar_t>(coef * (p - (k == yp[i] ? acc_t(1) : acc_t(0))));
          rgr[k] = static_cast<scalar_t>(coef * p * (acc_t(rzr[k]) - dot));
        }
        lp[i] = static_cast<double>(coef * (lse - acc_t(zr[yp[i]])));
      }
    });
  });
  return {row_loss.sum().to(z.scalar_type()), G};
}

}  // namespace


// ---- scratch-buffer pool -------------------------------------------------------------------------

at::Tensor Workspace::get(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  const int64_t nbytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(opts.dtype().toScalarType()));
  if (nbytes == 0) return at::empty(sizes, opts);
  int64_t best = -1;
  for (size_t i = 0; i < bufs_.size(); ++i) {
    const int64_t have = bufs_[i].bytes.numel();
    if (!bufs_[i].used && have >= nbytes && (best < 0 || have < bufs_[best].bytes.numel())) best = static_cast<int64_t>(i);
  }
  if (best < 0) {
    bufs_.push_back(Buf{at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).device(at::kCPU))});
    best = static_cast<int64_t>(bufs_.size()) - 1;
  }
  Buf& b = bufs_[best];
  b.used = b.touched = true;
  return b.bytes.narrow(0, 0, nbytes).view(opts.dtype().toScalarType()).view(sizes);
}

void Workspace::release(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return;
  const void* p = t.storage().data();
  for (auto& b : bufs_)
    if (b.bytes.storage().data() == p) b.used = false;
}

void Workspace::end_call() {
  std::vector<Buf> keep;
  for (auto& b : bufs_)
    if (b.touched) keep.push_back(Buf{b.bytes});
  bufs_ = std::move(keep);
}

int64_t Workspace::clear() {
  const int64_t n = bytes();
  bufs_.clear();
  return n;
}

int64_t Workspace::bytes() const {
  int64_t n = 0;
  for (const auto& b : bufs_) n += b.bytes.numel();
  return n;
}

Workspace& cpu_workspace() {
  thread_local Workspace ws;
  return ws;
}

int64_t release_workspace() { return cpu_workspace().clear(); }

// ---- NHWC im2col / col2im -----------------------------------------------------------------------

void im2col_nhwc(const at::Tensor& a, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                 int64_t dw, int64_t Ho, int64_t Wo, at::Tensor& cols) {
  TORCH_CHECK(a.dim() == 4 && a.is_contiguous(), "im2col_nhwc: expected a contiguous (N, H, W, C) tensor");
  const int64_t N = a.size(0), H = a.size(1), W = a.size(2), C = a.size(3), K = kh * kw * C;
  TORCH_CHECK(cols.is_contiguous() && cols.numel() == N * Ho * Wo * K, "im2col_nhwc: bad output");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "im2col_nhwc", [&] {
    const scalar_t* src = a.data_ptr<scalar_t>();
    scalar_t* dst = cols.data_ptr<scalar_t>();
    at::parallel_for(0, N * Ho, grain_for(Wo * K), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / Ho, ho = r % Ho;
        for (int64_t wo = 0; wo < Wo; ++wo) {
          scalar_t* row = dst + (r * Wo + wo) * K;
          const int64_t w0 = wo * sw - pw;
          for (int64_t i = 0; i < kh; ++i) {
            const int64_t hi = ho * sh - ph + i * dh;
            scalar_t* seg = row + i * kw * C;
            if (hi < 0 || hi >= H) {
              std::memset(seg, 0, sizeof(scalar_t) * kw * C);
              continue;
            }
            const scalar_t* srow = src + ((n * H + hi) * W) * C;
            if (dw == 1 && w0 >= 0 && w0 + kw <= W) {  // the kw taps are one contiguous run of kw * C values
              std::memcpy(seg, srow + w0 * C, sizeof(scalar_t) * kw * C);
              continue;
            }
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t wi = w0 + j * dw;
              if (wi < 0 || wi >= W)
                std::memset(seg + j * C, 0, sizeof(scalar_t) * C);
              else
                std::memcpy(seg + j * C, srow + wi * C, sizeof(scalar_t) * C);
            }
          }
        }
      }
    });
  });
}

void col2im_nhwc(const at::Tensor& cols, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                 int64_t dh, int64_t dw, int64_t Ho, int64_t Wo, at::Tensor& out) {
  TORCH_CHECK(out.dim() == 4 && out.is_contiguous(), "col2im_nhwc: out must be a contiguous (N, H, W, C) tensor");
  const int64_t N = out.size(0), H = out.size(1), W = out.size(2), C = out.size(3), K = kh * kw * C;
  TORCH_CHECK(cols.dim() == 2 && cols.size(0) == N * Ho * Wo && cols.size(1) == K && cols.is_contiguous(),
              "col2im_nhwc: cols must be a contiguous (N*Ho*Wo, kh*kw*C) matrix");
  out.zero_();
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "col2im_nhwc", [&] {
    const scalar_t* src = cols.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    // one task per image: the images' outputs do not overlap, so no atomics are needed
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        scalar_t* img = dst + n * H * W * C;
        for (int64_t ho = 0; ho < Ho; ++ho) {
          for (int64_t wo = 0; wo < Wo; ++wo) {
            const scalar_t* row = src + ((n * Ho + ho) * Wo + wo) * K;
            for (int64_t i = 0; i < kh; ++i) {
              const int64_t hi = ho * sh - ph + i * dh;
              if (hi < 0 || hi >= H) continue;
              for (int64_t j = 0; j < kw; ++j) {
                const int64_t wi = wo * sw - pw + j * dw;
                if (wi < 0 || wi >= W) continue;
                scalar_t* o = img + (hi * W + wi) * C;
                const scalar_t* s = row + (i * kw + j) * C;
                for (int64_t c = 0; c < C; ++c) o[c] += s[c];
              }
            }
          }
        }
      }
    });
  });
}

// ---- NHWC pooling --------------------------------------------------------------------------------

void maxpool_pair_nhwc(const at::Tensor& a, int64_t B, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                       int64_t pw, int64_t dh, int64_t dw, at::Tensor& out, at::Tensor& index) {
  TORCH_CHECK(a.dim() == 4 && a.is_contiguous() && (a.size(0) == B || a.size(0) == 2 * B),
              "maxpool_pair_nhwc: expected a contiguous (B or 2B, H, W, C) tensor");
  const int64_t N = a.size(0), H = a.size(1), W = a.size(2), C = a.size(3), Ho = out.size(1), Wo = out.size(2);
  TORCH_CHECK(out.is_contiguous() && out.size(0) == N && out.size(3) == C && index.is_contiguous() &&
                  index.scalar_type() == at::kLong && index.numel() == B * Ho * Wo * C,
              "maxpool_pair_nhwc: bad outputs");
  const bool pair = N == 2 * B;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "maxpool_pair_nhwc", [&] {
    const scalar_t* src = a.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    int64_t* idx = index.data_ptr<int64_t>();
    const int64_t img = H * W * C, oimg = Ho * Wo * C;
    at::parallel_for(0, B * Ho, grain_for(Wo * C * kh * kw), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / Ho, ho = r % Ho;
        int64_t h0 = ho * sh - ph;
        const int64_t h1 = std::min(h0 + (kh - 1) * dh + 1, H);
        while (h0 < 0) h0 += dh;
        for (int64_t wo = 0; wo < Wo; ++wo) {
          int64_t w0 = wo * sw - pw;
          const int64_t w1 = std::min(w0 + (kw - 1) * dw + 1, W);
          while (w0 < 0) w0 += dw;
          scalar_t* o = dst + n * oimg + (ho * Wo + wo) * C;
          int64_t* ix = idx + n * oimg + (ho * Wo + wo) * C;
          // same scan order, tie rule (first strict maximum) and NaN rule as ATen's max_pool2d
          for (int64_t c = 0; c < C; ++c) {
            o[c] = -std::numeric_limits<scalar_t>::infinity();
            ix[c] = h0 * W + w0;
          }
          for (int64_t hi = h0; hi < h1; hi += dh) {
            for (int64_t wi = w0; wi < w1; wi += dw) {
              const scalar_t* s = src + n * img + (hi * W + wi) * C;
              const int64_t pos = hi * W + wi;
              for (int64_t c = 0; c < C; ++c) {
                const scalar_t v = s[c];
                if (v > o[c] || std::isnan(v)) {
                  o[c] = v;
                  ix[c] = pos;
                }
              }
            }
          }
          if (pair) {
            scalar_t* ro = dst + (B + n) * oimg + (ho * Wo + wo) * C;
            const scalar_t* rs = src + (B + n) * img;
            for (int64_t c = 0; c < C; ++c) ro[c] = rs[ix[c] * C + c];
          }
        }
      }
    });
  });
}

void maxpool_pair_nhwc_backward(const at::Tensor& g, const at::Tensor& index, at::Tensor& out) {
  TORCH_CHECK(g.dim() == 4 && index.dim() == 4 && g.size(0) == 2 * index.size(0) &&
                  g.sizes().slice(1) == index.sizes().slice(1) && g.is_contiguous(),
              "maxpool_pair_nhwc_backward: g must be contiguous (2B, Ho, Wo, C) and index (B, Ho, Wo, C)");
  TORCH_CHECK(out.dim() == 4 && out.is_contiguous() && out.size(0) == g.size(0) && out.size(3) == g.size(3),
              "maxpool_pair_nhwc_backward: bad output");
  const int64_t N = g.size(0), B = N / 2, Ho = g.size(1), Wo = g.size(2), C = g.size(3), H = out.size(1), W = out.size(2);
  out.zero_();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "maxpool_pair_nhwc_backward", [&] {
    const scalar_t* src = g.data_ptr<scalar_t>();
    const int64_t* idx = index.data_ptr<int64_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t oimg = Ho * Wo * C, img = H * W * C;
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const int64_t* ix = idx + (n % B) * oimg;
        const scalar_t* s = src + n * oimg;
        scalar_t* d = dst + n * img;
        for (int64_t q = 0; q < Ho * Wo; ++q)
          for (int64_t c = 0; c < C; ++c) d[ix[q * C + c] * C + c] += s[q * C + c];
      }
    });
  });
}

namespace {

// Window of output (ho, wo) and its divisor, exactly as ATen's avg_pool2d.
struct AvgWin {
  int64_t h0, h1, w0, w1;
  int64_t div;
};

inline AvgWin avg_window(int64_t ho, int64_t wo, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                         int64_t ph, int64_t pw, bool count_include_pad, int64_t divisor_override) {
  int64_t h0 = ho * sh - ph, w0 = wo * sw - pw;
  int64_t h1 = std::min(h0 + kh, H + ph), w1 = std::min(w0 + kw, W + pw);
  const int64_t pool = (h1 - h0) * (w1 - w0);
  h0 = std::max<int64_t>(h0, 0);
  w0 = std::max<int64_t>(w0, 0);
  h1 = std::min(h1, H);
  w1 = std::min(w1, W);
  int64_t div;
  if (divisor_override > 0)
    div = divisor_override;
  else
    div = count_include_pad ? pool : (h1 - h0) * (w1 - w0);
  return {h0, h1, w0, w1, div};
}

}  // namespace

void avgpool_nhwc(const at::Tensor& a, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                  bool count_include_pad, int64_t divisor_override, at::Tensor& out) {
  TORCH_CHECK(a.dim() == 4 && a.is_contiguous(), "avgpool_nhwc: expected a contiguous (N, H, W, C) tensor");
  const int64_t N = a.size(0), H = a.size(1), W = a.size(2), C = a.size(3), Ho = out.size(1), Wo = out.size(2);
  TORCH_CHECK(out.is_contiguous() && out.size(0) == N && out.size(3) == C, "avgpool_nhwc: bad output");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "avgpool_nhwc", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* src = a.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * Ho, grain_for(Wo * C * kh * kw), [&](int64_t b, int64_t e) {
      std::vector<acc_t> acc(C);
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / Ho, ho = r % Ho;
        for (int64_t wo = 0; wo < Wo; ++wo) {
          const AvgWin win = avg_window(ho, wo, H, W, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override);
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t hi = win.h0; hi < win.h1; ++hi)
            for (int64_t wi = win.w0; wi < win.w1; ++wi) {
              const scalar_t* s = src + ((n * H + hi) * W + wi) * C;
              for (int64_t c = 0; c < C; ++c) acc[c] += s[c];
            }
          scalar_t* o = dst + ((n * Ho + ho) * Wo + wo) * C;
          for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c] / acc_t(win.div));
        }
      }
    });
  });
}

void avgpool_nhwc_backward(const at::Tensor& g, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                           bool count_include_pad, int64_t divisor_override, at::Tensor& out) {
  TORCH_CHECK(g.dim() == 4 && g.is_contiguous(), "avgpool_nhwc_backward: g must be contiguous (N, Ho, Wo, C)");
  TORCH_CHECK(out.dim() == 4 && out.is_contiguous() && out.size(0) == g.size(0) && out.size(3) == g.size(3),
              "avgpool_nhwc_backward: bad output");
  const int64_t N = g.size(0), Ho = g.size(1), Wo = g.size(2), C = g.size(3), H = out.size(1), W = out.size(2);
  out.zero_();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "avgpool_nhwc_backward", [&] {
    const scalar_t* src = g.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n)
        for (int64_t ho = 0; ho < Ho; ++ho)
          for (int64_t wo = 0; wo < Wo; ++wo) {
            const AvgWin win = avg_window(ho, wo, H, W, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override);
            const scalar_t* s = src + ((n * Ho + ho) * Wo + wo) * C;
            for (int64_t hi = win.h0; hi < win.h1; ++hi)
              for (int64_t wi = win.w0; wi < win.w1; ++wi) {
                scalar_t* d = dst + ((n * H + hi) * W + wi) * C;
                for (int64_t c = 0; c < C; ++c) d[c] += s[c] / static_cast<scalar_t>(win.div);
              }
          }
    });
  });
}

// ---- bias sums and BatchNorm (channels last) -------------------------------------------------------

namespace {

// Per-channel sums over rows [r0, r1) of up to 4 products, accumulated per task and then combined.
// f(row, c, acc) adds the row's contributions for channel c into acc[0..nout).
template <typename F>
std::vector<at::Tensor> channel_sums(int64_t rows, int64_t C, int nout, const at::TensorOptions& opts, F f) {
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, rows));
  std::vector<double> part(static_cast<size_t>(tasks * nout * C), 0.0);
  const int64_t chunk = (rows + tasks - 1) / tasks;
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      double* acc = part.data() + t * nout * C;
      const int64_t r1 = std::min(rows, (t + 1) * chunk);
      for (int64_t r = t * chunk; r < r1; ++r) f(r, acc);
    }
  });
  std::vector<at::Tensor> out;
  for (int k = 0; k < nout; ++k) {
    at::Tensor s = at::zeros({C}, opts.dtype(at::kDouble));
    double* sp = s.data_ptr<double>();
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t c = 0; c < C; ++c) sp[c] += part[(t * nout + k) * C + c];
    out.push_back(s.to(opts.dtype().toScalarType()));
  }
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> colsum_pair(const at::Tensor& g, int64_t M) {
  TORCH_CHECK(g.dim() == 2 && g.size(0) == 2 * M && g.is_contiguous(), "colsum_pair: g must be contiguous (2M, O)");
  const int64_t O = g.size(1);
  std::vector<at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "colsum_pair", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    r = channel_sums(M, O, 2, g.options(), [&](int64_t row, double* acc) {
      const scalar_t* a = gp + row * O;
      const scalar_t* b = gp + (M + row) * O;
      for (int64_t c = 0; c < O; ++c) {
        acc[c] += a[c];
        acc[O + c] += b[c];
      }
    });
  });
  return {r[0], r[1]};
}

void batchnorm_pair_nhwc(const at::Tensor& a, int64_t B, const at::Tensor& mean, const at::Tensor& inv_std,
                         const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& vg, const at::Tensor& vb,
                         at::Tensor& out) {
  const int64_t C = a.size(-1), rows = a.numel() / C / a.size(0) * B;  // rows of one half
  const bool r_zero = a.size(0) == B;
  TORCH_CHECK(a.is_contiguous() && out.is_contiguous() && out.numel() == 2 * rows * C, "batchnorm_pair_nhwc: bad tensors");
  const bool affine = gamma.defined();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "batchnorm_pair_nhwc", [&] {
    const scalar_t* x = a.data_ptr<scalar_t>();
    const scalar_t* rx = r_zero ? nullptr : x + rows * C;
    const scalar_t* mu = mean.data_ptr<scalar_t>();
    const scalar_t* is = inv_std.data_ptr<scalar_t>();
    const scalar_t* ga = affine ? gamma.data_ptr<scalar_t>() : nullptr;
    const scalar_t* be = affine ? beta.data_ptr<scalar_t>() : nullptr;
    const scalar_t* g_t = affine ? vg.data_ptr<scalar_t>() : nullptr;
    const scalar_t* b_t = affine ? vb.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* ro = o + rows * C;
    at::parallel_for(0, rows, grain_for(C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = r * C + c;
          const scalar_t ah = (x[i] - mu[c]) * is[c];
          if (affine) {
            o[i] = ah * ga[c] + be[c];
            ro[i] = ah * g_t[c] + b_t[c] + (rx ? rx[i] * (is[c] * ga[c]) : scalar_t(0));
          } else {
            o[i] = ah;
            ro[i] = rx ? rx[i] * is[c] : scalar_t(0);
          }
        }
      }
    });
  });
}

std::vector<at::Tensor> batchnorm_pair_nhwc_backward(const at::Tensor& g, const at::Tensor& a, int64_t B,
                                                     const at::Tensor& mean, const at::Tensor& inv_std,
                                                     const at::Tensor& gamma, const at::Tensor& vg, bool params,
                                                     at::Tensor* gi) {
  const int64_t C = g.size(-1), rows = g.numel() / C / 2;
  const bool r_zero = a.size(0) == B;
  TORCH_CHECK(g.is_contiguous() && a.is_contiguous(), "batchnorm_pair_nhwc_backward: tensors must be contiguous");
  const bool affine = gamma.defined();
  std::vector<at::Tensor> sums;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "batchnorm_pair_nhwc_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* rgp = gp + rows * C;
    const scalar_t* x = a.data_ptr<scalar_t>();
    const scalar_t* rx = r_zero ? nullptr : x + rows * C;
    const scalar_t* mu = mean.data_ptr<scalar_t>();
    const scalar_t* is = inv_std.data_ptr<scalar_t>();
    const scalar_t* ga = affine ? gamma.data_ptr<scalar_t>() : nullptr;
    const scalar_t* g_t = affine ? vg.data_ptr<scalar_t>() : nullptr;
    if (gi != nullptr) {
      scalar_t* o = gi->data_ptr<scalar_t>();
      scalar_t* ro = o + rows * C;
      at::parallel_for(0, rows, grain_for(C), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = r * C + c;
            const scalar_t sc = affine ? is[c] * ga[c] : is[c];
            o[i] = gp[i] * sc;
            ro[i] = rgp[i] * sc + (affine ? gp[i] * (is[c] * g_t[c]) : scalar_t(0));
          }
      });
    }
    if (params && affine) {
      sums = channel_sums(rows, C, 4, g.options(), [&](int64_t r, double* acc) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = r * C + c;
          const double ah = double((x[i] - mu[c]) * is[c]);
          acc[c] += double(gp[i]) * ah;
          acc[C + c] += double(gp[i]);
          acc[2 * C + c] += double(rgp[i]) * ah + (rx ? double(gp[i]) * double(rx[i]) * double(is[c]) : 0.0);
          acc[3 * C + c] += double(rgp[i]);
        }
      });
    }
  });
  return sums;
}

}  // namespace engine_hvp

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("relu_rop_", &engine_hvp::relu_rop_cpu_);
  m.impl("relu_rop_backward_", &engine_hvp::relu_rop_backward_cpu_);
  m.impl("softmax_xent_rop", &engine_hvp::softmax_xent_rop_cpu);
  m.impl("hvp_sequential", &engine_hvp::hvp_sequential);
}

// The ops are not differentiable (they are derivatives already): inputs that require grad run the
// kernels below autograd, and a backward through the outputs raises "not implemented".
TORCH_LIBRARY_IMPL(engine, Autograd, m) {
  m.impl("relu_rop_", torch::autograd::autogradNotImplementedFallback());
  m.impl("relu_rop_backward_", torch::autograd::autogradNotImplementedFallback());
  m.impl("softmax_xent_rop", torch::autograd::autogradNotImplementedFallback());
  m.impl("hvp_sequential", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(engine, ADInplaceOrView, m) {
  m.impl("relu_rop_", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
  m.impl("relu_rop_backward_", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
}
