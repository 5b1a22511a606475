// CPU implementation of engine::conv_pool_relu: one convolution stage of a LeNet-style network for
// certification's forward passes, fused per sample so that the full-resolution convolution output
// never leaves the L1/L2 cache:
//     out = relu(maxpool2x2(conv2d((x - mean) / std, weight, bias)))      (channels-last output)
// for a stride-1 / unpadded / undilated convolution with any number of input channels and a 2x2,
// stride-2, floor-mode max pool (mean 0 and std 1: no normalisation). oneDNN runs LeNet's
// convolutions (1 -> 20 and 20 -> 50 channels, 5x5, on 28x28 and 12x12 inputs) at about a third of
// the machine's FMA rate and writes each whole (B, O, Ho, Wo) output to memory before the pool reads
// it back; here each block of output rows is accumulated in registers, pooled at once, and only the
// pooled values are written.
// Each output is summed over (input channel, kernel row, kernel column) in that order, so results
// equal the unfused reference up to float32 rounding (tests/test_conv_pool.py compares in float64).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

// Geometry of one sample's convolution: xc (C, H, W) planes, weights (C, kh, kw, O) with the
// output channels innermost, and a scratch block of output rows laid out (rows, O, Wc).
struct Geometry {
  int64_t C, H, W, O, kh, kw, Wc;  // Wc: convolution columns kept (2 * pooled width)
};

// R output rows (i0 ..) x CW output columns (j0 ..) x OB output channels (o ..), accumulated in
// registers over all (ci, di, dj): each step loads R input vectors and broadcasts OB weights for
// R * OB independent FMAs (R * OB + R + 1 registers). GCC vector types; the caller's target picks
// AVX-512 / AVX2 / SSE registers. dst: the rows block at (row 0, channel o, column j0).
template <int CW, int R, int OB, int KW>
__attribute__((always_inline)) inline void conv_tile(const float* xc, const Geometry& g, int64_t i0, int64_t j0,
                                                     const float* w, float* dst) {
  typedef float vec __attribute__((vector_size(CW * sizeof(float))));
  const int64_t kw = KW > 0 ? KW : g.kw;  // a compile-time width unrolls the innermost loop
  vec acc[R][OB];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < OB; ++c) acc[r][c] = vec{};
  for (int64_t ci = 0; ci < g.C; ++ci) {
    const float* xp = xc + (ci * g.H + i0) * g.W + j0;
    const float* wp = w + ci * g.kh * kw * g.O;
    for (int64_t di = 0; di < g.kh; ++di) {
      for (int64_t dj = 0; dj < kw; ++dj) {
        vec xv[R];
        for (int r = 0; r < R; ++r) std::memcpy(&xv[r], xp + (r + di) * g.W + dj, sizeof(vec));
        const float* wt = wp + (di * kw + dj) * g.O;
        for (int c = 0; c < OB; ++c) {
          const float wc = wt[c];
          for (int r = 0; r < R; ++r) acc[r][c] += wc * xv[r];  // an FMA (fp-contract=fast in the callers)
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < OB; ++c) std::memcpy(dst + (r * g.O + c) * g.Wc, &acc[r][c], sizeof(vec));
}

// The same sums one output at a time (columns left over after the vector tiles).
inline void conv_scalar(const float* xc, const Geometry& g, int64_t i, int64_t j, const float* w, int64_t o,
                        float* dst) {
  float acc = 0.0f;
  for (int64_t ci = 0; ci < g.C; ++ci)
    for (int64_t di = 0; di < g.kh; ++di)
      for (int64_t dj = 0; dj < g.kw; ++dj)
        acc = __builtin_fmaf(w[((ci * g.kh + di) * g.kw + dj) * g.O + o], xc[(ci * g.H + i + di) * g.W + j + dj], acc);
  *dst = acc;
}

// R rows x all kept columns x OB channels starting at channel o: column tiles of at most CWMAX
// (the target's native vector width: GCC splits wider generic vectors badly), then single columns.
template <int CWMAX, int R, int OB, int KW>
__attribute__((always_inline)) inline void conv_channels(const float* xc, const Geometry& g, int64_t i0, const float* w,
                                                         int64_t o, float* rows) {
  const float* wo = w + o;
  float* base = rows + o * g.Wc;
  int64_t j = 0;
  if constexpr (CWMAX >= 16)
    for (; j + 16 <= g.Wc; j += 16) conv_tile<16, R, OB, KW>(xc, g, i0, j, wo, base + j);
  if constexpr (CWMAX >= 8)
    for (; j + 8 <= g.Wc; j += 8) conv_tile<8, R, OB, KW>(xc, g, i0, j, wo, base + j);
  for (; j + 4 <= g.Wc; j += 4) conv_tile<4, R, OB, KW>(xc, g, i0, j, wo, base + j);
  for (; j < g.Wc; ++j)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < OB; ++c) conv_scalar(xc, g, i0 + r, j, w, o + c, rows + (r * g.O + o + c) * g.Wc + j);
}

// R rows (i0 ..) of every output channel into rows (R, O, Wc): OB channels at a time, then 4, 2, 1.
template <int CWMAX, int R, int OB, int KW>
__attribute__((always_inline)) inline void conv_rows(const float* xc, const Geometry& g, int64_t i0, const float* w,
                                                     float* rows) {
  int64_t o = 0;
  for (; o + OB <= g.O; o += OB) conv_channels<CWMAX, R, OB, KW>(xc, g, i0, w, o, rows);
  if constexpr (OB > 4)
    for (; o + 4 <= g.O; o += 4) conv_channels<CWMAX, R, 4, KW>(xc, g, i0, w, o, rows);
  if constexpr (OB > 2)
    for (; o + 2 <= g.O; o += 2) conv_channels<CWMAX, R, 2, KW>(xc, g, i0, w, o, rows);
  for (; o < g.O; ++o) conv_channels<CWMAX, R, 1, KW>(xc, g, i0, w, o, rows);
}

// Pool R rows (R even) of the rows block into pooled rows pr0 .. of out (Hp, Wp, O), + bias, ReLU.
template <int R>
__attribute__((always_inline)) inline void pool_rows(const float* rows, const Geometry& g, const float* bias,
                                                     int64_t pr0, float* out) {
  const int64_t Wp = g.Wc / 2;
  for (int p = 0; p < R / 2; ++p) {
    float* dst = out + (pr0 + p) * Wp * g.O;
    for (int64_t o = 0; o < g.O; ++o) {
      const float* a0 = rows + ((2 * p) * g.O + o) * g.Wc;
      const float* a1 = rows + ((2 * p + 1) * g.O + o) * g.Wc;
      const float b = bias[o];
      for (int64_t q = 0; q < Wp; ++q) {
        // max over the window, then + bias (rounding is monotone: the same as max of biased values), then ReLU
        const float m = std::max(std::max(a0[2 * q], a0[2 * q + 1]), std::max(a1[2 * q], a1[2 * q + 1])) + b;
        dst[q * g.O + o] = m > 0.0f ? m : 0.0f;
      }
    }
  }
}

// All pooled rows of one sample: convolution rows in blocks of RMAX (then 2: the pool reads whole pairs).
template <int CWMAX, int RMAX, int OB, int KW>
__attribute__((always_inline)) inline void conv_pool_rows(const float* xc, const Geometry& g, const float* w,
                                                          const float* bias, float* out, float* rows) {
  const int64_t Hc = 2 * ((g.H - g.kh + 1) / 2);  // convolution rows the pool reads
  int64_t i = 0;
  for (; i + RMAX <= Hc; i += RMAX) {
    conv_rows<CWMAX, RMAX, OB, KW>(xc, g, i, w, rows);
    pool_rows<RMAX>(rows, g, bias, i / 2, out);
  }
  if constexpr (RMAX > 2)
    for (; i + 2 <= Hc; i += 2) {
      conv_rows<CWMAX, 2, OB, KW>(xc, g, i, w, rows);
      pool_rows<2>(rows, g, bias, i / 2, out);
    }
}

// One sample. xin: (H, W, C) channels-last pixels; out: (Hp, Wp, O). Scratch: xc (C, H, W) and
// rows (RMAX, O, Wc).
template <int CWMAX, int RMAX, int OB>
__attribute__((always_inline)) inline void sample_kernel(const float* xin, const Geometry& g, bool normalize, float mean,
                                                         float stdv, const float* w, const float* bias, float* out,
                                                         float* xc, float* rows) {
  const int64_t HW = g.H * g.W;
  for (int64_t p = 0; p < HW; ++p)  // (H, W, C) -> (C, H, W), with the model's Normalize (same arithmetic)
    for (int64_t ci = 0; ci < g.C; ++ci) {
      const float v = xin[p * g.C + ci];
      xc[ci * HW + p] = normalize ? (v - mean) / stdv : v;
    }
  if (g.kw == 5)  // LeNet's kernels
    conv_pool_rows<CWMAX, RMAX, OB, 5>(xc, g, w, bias, out, rows);
  else
    conv_pool_rows<CWMAX, RMAX, OB, 0>(xc, g, w, bias, out, rows);
}

// Samples [b0, b1) with per-thread scratch buffers; inlined into one function per instruction set.
template <int CWMAX, int RMAX, int OB>
__attribute__((always_inline)) inline void run_samples(const float* x, int64_t b0, int64_t b1, const Geometry& g,
                                                       bool normalize, float mean, float stdv, const float* w,
                                                       const float* bias, float* out, int64_t out_stride) {
  std::vector<float> xc(g.C * g.H * g.W), rows(RMAX * g.O * g.Wc);
  const int64_t in_stride = g.C * g.H * g.W;
  for (int64_t b = b0; b < b1; ++b)
    sample_kernel<CWMAX, RMAX, OB>(x + b * in_stride, g, normalize, mean, stdv, w, bias, out + b * out_stride,
                                   xc.data(), rows.data());
}

// The same code compiled for AVX-512 (32 registers: 4 rows x 6 channels of accumulators), for
// AVX2 + FMA and for the baseline ISA (16 registers: 2 rows x 6 channels), chosen at run time.
#define ENGINE_CONV_POOL_ARGS                                                                                  \
  const float *x, int64_t b0, int64_t b1, const Geometry &g, bool normalize, float mean, float stdv,          \
      const float *w, const float *bias, float *out, int64_t out_stride
#define ENGINE_CONV_POOL_OPT optimize("O3,fp-contract=fast,no-predictive-commoning")
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"), ENGINE_CONV_POOL_OPT)) void run_avx512(ENGINE_CONV_POOL_ARGS) {
  run_samples<16, 4, 6>(x, b0, b1, g, normalize, mean, stdv, w, bias, out, out_stride);
}
__attribute__((target("avx2,fma"), ENGINE_CONV_POOL_OPT)) void run_avx2(ENGINE_CONV_POOL_ARGS) {
  run_samples<8, 2, 6>(x, b0, b1, g, normalize, mean, stdv, w, bias, out, out_stride);
}
__attribute__((ENGINE_CONV_POOL_OPT)) void run_generic(ENGINE_CONV_POOL_ARGS) {
  run_samples<4, 2, 6>(x, b0, b1, g, normalize, mean, stdv, w, bias, out, out_stride);
}
#undef ENGINE_CONV_POOL_OPT
#undef ENGINE_CONV_POOL_ARGS

// The best variant this CPU runs: 2: AVX-512 (F, DQ, VL), 1: AVX2 + FMA, 0: baseline.
int64_t supported_level() {
  static const int64_t supported = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  return supported;
}

// The variant conv_pool_relu runs: the best one, or the one ENGINE_CPU_ISA=avx512|avx2|generic asks for, lowered to
// what the CPU supports (native or unset: the best; tests run every variant and check which one ran with
// engine::cpu_isa). Any other value is an error, so that a misspelt request cannot silently test another variant.
int64_t isa_level() {
  const int64_t supported = supported_level();
  const char* req = std::getenv("ENGINE_CPU_ISA");
  if (req == nullptr || *req == '\0') return supported;
  const std::string r(req);
  if (r == "native") return supported;
  if (r == "avx512") return std::min<int64_t>(supported, 2);
  if (r == "avx2") return std::min<int64_t>(supported, 1);
  if (r == "generic") return 0;
  TORCH_CHECK(false, "ENGINE_CPU_ISA must be one of native, avx512, avx2, generic; got '", r, "'");
}

const char* level_name(int64_t level) { return level == 2 ? "avx512" : level == 1 ? "avx2" : "generic"; }

// x (B, C, H, W) float32 (any layout; read channels-last); weight (O, C, kh, kw); bias (O); mean, std:
// a scalar Normalize applied first (mean 0, std 1: none). Returns (B, O, Hp, Wp) in channels-last memory.
at::Tensor conv_pool_relu_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double mean,
                              double stdv) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat,
              "conv_pool_relu: x, weight and bias must be float32");
  TORCH_CHECK(x.dim() == 4, "conv_pool_relu: x must have shape (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1), "conv_pool_relu: weight must have shape (O, ", x.size(1),
              ", kh, kw) for x with ", x.size(1), " channels, got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "conv_pool_relu: bias must have shape (",
              weight.size(0), "), got ", bias.sizes());
  TORCH_CHECK(stdv > 0, "conv_pool_relu: std must be positive, got ", stdv);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(C >= 1 && O >= 1 && kh >= 1 && kw >= 1, "conv_pool_relu: empty channels or kernel: x ", x.sizes(),
              ", weight ", weight.sizes());
  TORCH_CHECK(H >= kh + 1 && W >= kw + 1, "conv_pool_relu: a ", H, "x", W, " input is too small for a ", kh, "x", kw,
              " convolution followed by a 2x2 pool");
  const int64_t Hp = (H - kh + 1) / 2, Wp = (W - kw + 1) / 2;
  auto out = at::empty({B, O, Hp, Wp}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (B == 0) return out;
  auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  auto wt = weight.permute({1, 2, 3, 0}).contiguous();  // (C, kh, kw, O): output channels innermost
  auto bc = bias.contiguous();
  const float* xp = xc.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Geometry g{C, H, W, O, kh, kw, 2 * Wp};
  const bool normalize = !(mean == 0.0 && stdv == 1.0);
  const float fm = static_cast<float>(mean), fs = static_cast<float>(stdv);
  const int64_t out_stride = Hp * Wp * O;
  const int64_t level = isa_level();
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    if (level == 2)
      run_avx512(xp, b0, b1, g, normalize, fm, fs, wp, bp, op, out_stride);
    else if (level == 1)
      run_avx2(xp, b0, b1, g, normalize, fm, fs, wp, bp, op, out_stride);
    else
      run_generic(xp, b0, b1, g, normalize, fm, fs, wp, bp, op, out_stride);
  });
  return out;
}

}  // namespace

namespace engine_conv_pool {
// engine::cpu_isa: the variant of conv_pool_relu in effect now ("avx512", "avx2" or "generic"; ENGINE_CPU_ISA
// applied), or with supported=true the best variant this CPU can run.
std::string cpu_isa(bool supported) { return level_name(supported ? supported_level() : isa_level()); }
}  // namespace engine_conv_pool

TORCH_LIBRARY_IMPL(engine, CPU, m) { m.impl("conv_pool_relu", &conv_pool_relu_cpu); }
