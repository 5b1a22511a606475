// CPU implementation of engine::conv1_pool_relu: the first layer of a LeNet-style network for
// certification's forward passes, fused per sample so that the full-resolution convolution output
// never leaves the L1/L2 cache:
//     out = relu(maxpool2x2(conv2d((x - mean) / std, weight, bias)))      (NHWC output)
// for a single-channel input, a stride-1 / unpadded / undilated convolution and a 2x2, stride-2,
// floor-mode max pool. oneDNN runs such a convolution (one input channel, 25 taps) far below the
// machine's FMA rate and writes its whole (B, O, Ho, Wo) output to memory before the pool reads it
// back; here each pair of output rows is accumulated in a small buffer and pooled at once.
// The summation order over taps is fixed (row by row, left to right), so results equal the
// unfused reference up to float32 rounding (tests/test_conv_pool.py compares them in float64 too).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

// CW output columns of one output row i for OB output channels, accumulated in registers over all
// taps: acc[c][t] = sum_{di, dj} w[c, di, dj] * xn[i + di, j0 + t + dj] (rows top to bottom, taps left
// to right). GCC vector types give one unaligned load of the CW inputs per tap, shared by the OB
// channels, whose OB independent FMA chains hide the FMA latency; the caller's target picks
// AVX-512 / AVX2 / SSE registers. w: OB rows of kh*kw taps; dst: OB rows of stride `ld`.
template <int CW, int OB>
__attribute__((always_inline)) inline void conv_cols(const float* xn, int64_t W, int64_t i, int64_t j0, const float* w,
                                                     int64_t kh, int64_t kw, float* dst, int64_t ld) {
  typedef float vec __attribute__((vector_size(CW * sizeof(float))));
  vec acc[OB];
  for (int c = 0; c < OB; ++c) acc[c] = vec{};
  const int64_t taps = kh * kw;
  for (int64_t di = 0; di < kh; ++di) {
    const float* xr = xn + (i + di) * W + j0;
    for (int64_t dj = 0; dj < kw; ++dj) {
      vec xv;
      std::memcpy(&xv, xr + dj, sizeof(vec));
      const int64_t tap = di * kw + dj;
      for (int c = 0; c < OB; ++c) acc[c] += w[c * taps + tap] * xv;  // an FMA (fp-contract=fast in the callers)
    }
  }
  for (int c = 0; c < OB; ++c) std::memcpy(dst + c * ld, &acc[c], sizeof(vec));
}

// All output columns of row i for OB channels starting at w / dst, in column blocks of at most CWMAX
// (the target's native vector width: GCC splits wider generic vectors badly).
template <int OB, int CWMAX>
__attribute__((always_inline)) inline void conv_row(const float* xn, int64_t W, int64_t Wo, int64_t i, const float* w,
                                                    int64_t kh, int64_t kw, float* dst) {
  int64_t j = 0;
  if constexpr (CWMAX >= 16)
    for (; j + 16 <= Wo; j += 16) conv_cols<16, OB>(xn, W, i, j, w, kh, kw, dst + j, Wo);
  if constexpr (CWMAX >= 8)
    for (; j + 8 <= Wo; j += 8) conv_cols<8, OB>(xn, W, i, j, w, kh, kw, dst + j, Wo);
  for (; j + 4 <= Wo; j += 4) conv_cols<4, OB>(xn, W, i, j, w, kh, kw, dst + j, Wo);
  for (; j < Wo; ++j) {
    for (int c = 0; c < OB; ++c) {
      const float* wc = w + c * kh * kw;
      float acc = 0.0f;
      for (int64_t di = 0; di < kh; ++di)
        for (int64_t dj = 0; dj < kw; ++dj) acc = __builtin_fmaf(wc[di * kw + dj], xn[(i + di) * W + j + dj], acc);
      dst[c * Wo + j] = acc;
    }
  }
}

// One sample. xin: (H, W) raw pixels; w: (O, kh, kw) taps; out: (Hp, Wp, O).
// rows: scratch (2, O, Wo) (the two convolution rows of one pooled row); xn: scratch (H, W).
// CW: the target's vector width in floats (16 AVX-512, 8 AVX2, 4 SSE); 8 channels at once (8 FMA
// chains, 8 accumulator registers).
template <int CW>
__attribute__((always_inline)) inline void sample_kernel(const float* xin, int64_t H, int64_t W, float mean, float stdv,
                                                         const float* w, const float* bias, int64_t O, int64_t kh,
                                                         int64_t kw, float* out, float* rows, float* xn) {
  const int64_t Ho = H - kh + 1, Wo = W - kw + 1, Hp = Ho / 2, Wp = Wo / 2;
  for (int64_t p = 0; p < H * W; ++p) xn[p] = (xin[p] - mean) / stdv;  // the model's Normalize, same arithmetic
  for (int64_t pr = 0; pr < Hp; ++pr) {
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t i = 2 * pr + half;
      float* base = rows + half * O * Wo;
      int64_t o = 0;
      for (; o + 8 <= O; o += 8) conv_row<8, CW>(xn, W, Wo, i, w + o * kh * kw, kh, kw, base + o * Wo);
      for (; o + 4 <= O; o += 4) conv_row<4, CW>(xn, W, Wo, i, w + o * kh * kw, kh, kw, base + o * Wo);
      for (; o < O; ++o) conv_row<1, CW>(xn, W, Wo, i, w + o * kh * kw, kh, kw, base + o * Wo);
    }
    float* dst = out + pr * Wp * O;
    for (int64_t o = 0; o < O; ++o) {
      const float* a0 = rows + o * Wo;
      const float* a1 = rows + (O + o) * Wo;
      const float b = bias[o];
      for (int64_t q = 0; q < Wp; ++q) {
        // max over the window, then + bias (rounding is monotone: the same as max of biased values), then ReLU
        const float m = std::max(std::max(a0[2 * q], a0[2 * q + 1]), std::max(a1[2 * q], a1[2 * q + 1])) + b;
        dst[q * O + o] = m > 0.0f ? m : 0.0f;
      }
    }
  }
}

// Samples [b0, b1) with per-thread scratch buffers; inlined into one function per instruction set.
template <int CW>
__attribute__((always_inline)) inline void run_samples(const float* x, int64_t b0, int64_t b1, int64_t H, int64_t W,
                                                       float mean, float stdv, const float* w, const float* bias,
                                                       int64_t O, int64_t kh, int64_t kw, float* out,
                                                       int64_t out_stride) {
  std::vector<float> rows(2 * (W - kw + 1) * O), xn(H * W);
  for (int64_t b = b0; b < b1; ++b)
    sample_kernel<CW>(x + b * H * W, H, W, mean, stdv, w, bias, O, kh, kw, out + b * out_stride, rows.data(), xn.data());
}

// The same code compiled for AVX-512, for AVX2 + FMA and for the baseline ISA (chosen at run time).
#define ENGINE_CONV_POOL_ARGS                                                                                       \
  const float *x, int64_t b0, int64_t b1, int64_t H, int64_t W, float mean, float stdv, const float *w,            \
      const float *bias, int64_t O, int64_t kh, int64_t kw, float *out, int64_t out_stride
#define ENGINE_CONV_POOL_OPT optimize("O3,fp-contract=fast,no-predictive-commoning")
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"), ENGINE_CONV_POOL_OPT)) void run_avx512(ENGINE_CONV_POOL_ARGS) {
  run_samples<16>(x, b0, b1, H, W, mean, stdv, w, bias, O, kh, kw, out, out_stride);
}
__attribute__((target("avx2,fma"), ENGINE_CONV_POOL_OPT)) void run_avx2(ENGINE_CONV_POOL_ARGS) {
  run_samples<8>(x, b0, b1, H, W, mean, stdv, w, bias, O, kh, kw, out, out_stride);
}
__attribute__((ENGINE_CONV_POOL_OPT)) void run_generic(ENGINE_CONV_POOL_ARGS) {
  run_samples<4>(x, b0, b1, H, W, mean, stdv, w, bias, O, kh, kw, out, out_stride);
}
#undef ENGINE_CONV_POOL_OPT
#undef ENGINE_CONV_POOL_ARGS

// 2: AVX-512, 1: AVX2 + FMA, 0: baseline; ENGINE_CPU_ISA=avx2|generic lowers it (tests run every variant).
int64_t isa_level() {
  static const int64_t supported = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  const char* req = std::getenv("ENGINE_CPU_ISA");
  if (req == nullptr) return supported;
  const std::string r(req);
  if (r == "generic") return 0;
  if (r == "avx2") return std::min<int64_t>(supported, 1);
  return supported;
}

// x (B, 1, H, W) float32; weight (O, 1, kh, kw); bias (O); mean, std: the Normalize constants.
// Returns (B, O, Hp, Wp) in channels-last memory (an (B, Hp, Wp, O) buffer).
at::Tensor conv1_pool_relu_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double mean,
                               double stdv) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat,
              "conv1_pool_relu: x, weight and bias must be float32");
  TORCH_CHECK(x.dim() == 4 && x.size(1) == 1, "conv1_pool_relu: x must have shape (B, 1, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1, "conv1_pool_relu: weight must have shape (O, 1, kh, kw), got ",
              weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "conv1_pool_relu: bias must have shape (",
              weight.size(0), "), got ", bias.sizes());
  TORCH_CHECK(stdv > 0, "conv1_pool_relu: std must be positive, got ", stdv);
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t O = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(H >= kh + 1 && W >= kw + 1, "conv1_pool_relu: a ", H, "x", W, " input is too small for a ", kh, "x", kw,
              " convolution followed by a 2x2 pool");
  const int64_t Hp = (H - kh + 1) / 2, Wp = (W - kw + 1) / 2;
  auto out = at::empty({B, O, Hp, Wp}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (B == 0) return out;
  auto xc = x.contiguous();
  auto wt = weight.reshape({O, kh * kw}).contiguous();  // (O, kh*kw)
  auto bc = bias.contiguous();
  const float* xp = xc.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fm = static_cast<float>(mean), fs = static_cast<float>(stdv);
  const int64_t out_stride = Hp * Wp * O;
  const int64_t level = isa_level();
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    if (level == 2)
      run_avx512(xp, b0, b1, H, W, fm, fs, wp, bp, O, kh, kw, op, out_stride);
    else if (level == 1)
      run_avx2(xp, b0, b1, H, W, fm, fs, wp, bp, O, kh, kw, op, out_stride);
    else
      run_generic(xp, b0, b1, H, W, fm, fs, wp, bp, O, kh, kw, op, out_stride);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engine, CPU, m) { m.impl("conv1_pool_relu", &conv1_pool_relu_cpu); }
