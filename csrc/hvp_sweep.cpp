// engine::hvp_sequential: loss, gradient, Hessian-vector product and mixed term of a sequential
// network in one forward + R-forward + backward + R-backward sweep (Pearlmutter 1994).
//
// For a layer z = f(a; W) with tangent V on W:
//   R-forward   R{z}   = f(R{a}; W) + f(a; V)                       (linear layers; f linear in W)
//   backward    g_a    = J_a^T g_z,           g_W = g_z (x) a
//   R-backward  R{g_a} = J_a^T R{g_z} + (d J_a^T / dW [V]) g_z,   R{g_W} = R{g_z} (x) a + g_z (x) R{a}
// and for softmax cross-entropy R{dL/dz} = p * R{z} - p (p . R{z}) per row, scaled like the loss.
// The mixed term d/dx (grad_W L . V) is R{g_x}, the R-backward carried down to the input.
//
// Activations are held as pairs [a; R{a}] stacked along the batch (see hvp.h), so that forward and
// R-forward are one GEMM / convolution over the concatenated batch plus the f(a; V) term, and the
// same for the input gradients of the backward sweep. Two algorithms:
//   kAlgoAten: NCHW, ATen convolution / convolution_backward / pooling (cuDNN on CUDA, oneDNN on CPU);
//   kAlgoGemm: CPU only, NHWC activations, explicit im2col + GEMM (the im2col of a layer input is
//              shared by the forward and the weight gradients), NHWC pooling loops.
// ReLU masks and the softmax cross-entropy R-op are the engine::relu_rop_ / relu_rop_backward_ /
// softmax_xent_rop ops (C++ on CPU, fused kernels on CUDA), called through the dispatcher.
// On CPU the large intermediates come from a pooled workspace (hvp.h, Workspace).
#include "hvp.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>

namespace engine_hvp {

int64_t pooling_out_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dil, bool ceil_mode) {
  const int64_t num = in + 2 * pad - dil * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  // floor division (num may be negative for tiny inputs)
  int64_t out = (num >= 0 ? num / stride : -((-num + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

namespace {

using at::Tensor;

// Pair activation: t is (2B, ...) = [a; R{a}], or (B, ...) = a alone when R{a} == 0 (r_zero).
struct Act {
  Tensor t;
  bool r_zero = true;
};

struct Layer {
  int64_t kind = 0;
  std::vector<int64_t> ints;
  int64_t p0 = 0, np = 0;  // parameters params[p0 : p0 + np]
  int64_t b0 = 0, nb = 0;  // buffers buffers[b0 : b0 + nb]
};

struct Saved {
  Act in;
  Tensor aux;               // ReLU: primal output (mask); MaxPool: argmax index; Conv (gemm): cached im2col
  std::vector<Tensor> own;  // workspace buffers this layer allocated (released after its backward)
};

const char* kind_name(int64_t kind) {
  switch (kind) {
    case kNormalize: return "Normalize";
    case kLinear: return "Linear";
    case kConv2d: return "Conv2d";
    case kReLU: return "ReLU";
    case kMaxPool2d: return "MaxPool2d";
    case kAvgPool2d: return "AvgPool2d";
    case kFlatten: return "Flatten";
    case kBatchNorm: return "BatchNorm";
    default: return "unknown";
  }
}

// ---- dispatcher handles of the device kernels ------------------------------------------------------

void call_relu_rop_(Tensor& pair) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("engine::relu_rop_", "").typed<void(Tensor&)>();
  op.call(pair);
}

void call_relu_rop_backward_(const Tensor& out_primal, Tensor& grad_pair) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("engine::relu_rop_backward_", "")
                       .typed<void(const Tensor&, Tensor&)>();
  op.call(out_primal, grad_pair);
}

std::tuple<Tensor, Tensor> call_softmax_xent_rop(const Tensor& logits_pair, const Tensor& y,
                                                 const std::optional<Tensor>& w) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("engine::softmax_xent_rop", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&)>();
  return op.call(logits_pair, y, w);
}


// ---- the sweep -------------------------------------------------------------------------------------

class Sweep {
 public:
  Sweep(int64_t B, bool nhwc, bool im2col, Workspace* ws, at::TensorList params, at::TensorList tangents,
        at::TensorList buffers)
      : B_(B), nhwc_(nhwc), im2col_(im2col), ws_(ws), params_(params), tangents_(tangents), buffers_(buffers) {}

  Act forward(const Layer& L, const Act& a, Saved& s, bool keep_cols);
  Tensor backward(const Layer& L, Saved& s, Tensor G, bool want_params, bool want_input, std::vector<Tensor>& grads,
                  std::vector<Tensor>& hvs);

  // Uninitialised scratch tensor: from the workspace (recorded in owner->own when given) or at::empty.
  Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& opts, Saved* owner = nullptr) {
    if (ws_ == nullptr) return at::empty(sizes, opts);
    Tensor t = ws_->get(sizes, opts);
    if (owner != nullptr) owner->own.push_back(t);
    return t;
  }
  void release(const Tensor& t) {
    if (ws_ != nullptr) ws_->release(t);
  }

 private:
  int64_t B_;
  bool nhwc_;    // activations (N, H, W, C) (CPU algorithms) instead of (N, C, H, W)
  bool im2col_;  // NHWC convolutions as explicit im2col + GEMM instead of ATen (oneDNN) convolutions
  Workspace* ws_;

  // (N, C, H, W) convolution result -> (N, H, W, C) view (a copy only if it is not channels-last).
  static Tensor nhwc_view(const Tensor& y) {
    Tensor v = y.permute({0, 2, 3, 1});
    return v.is_contiguous() ? v : v.contiguous();
  }
  at::TensorList params_, tangents_, buffers_;

  Tensor primal(const Act& a) const { return a.r_zero ? a.t : a.t.narrow(0, 0, B_); }
  Tensor tangent(const Act& a) const { return a.t.narrow(0, B_, B_); }
  Tensor top(const Tensor& g) const { return g.narrow(0, 0, B_); }
  Tensor bot(const Tensor& g) const { return g.narrow(0, B_, B_); }
  // Per-channel vector broadcast against an activation of ndim dims.
  Tensor chan(const Tensor& v, int64_t ndim) const {
    if (ndim == 2 || nhwc_) return v;
    return v.view({1, v.size(0), 1, 1});
  }
  std::vector<int64_t> chan_reduce_dims(int64_t ndim) const {
    if (ndim == 2) return {0};
    return nhwc_ ? std::vector<int64_t>{0, 1, 2} : std::vector<int64_t>{0, 2, 3};
  }
  // Sizes of a 4-D activation in the sweep's layout.
  int64_t C_of(const Tensor& t) const { return nhwc_ ? t.size(3) : t.size(1); }
  int64_t H_of(const Tensor& t) const { return nhwc_ ? t.size(1) : t.size(2); }
  int64_t W_of(const Tensor& t) const { return nhwc_ ? t.size(2) : t.size(3); }
  std::vector<int64_t> full_sizes(const Act& a) const {
    auto s = a.t.sizes().vec();
    s[0] = 2 * B_;
    return s;
  }

  // z-pair of a linear map of the (rows, K) operand `cols` into out (2M, O):
  // [cols_a W^T + b; cols_Ra W^T + cols_a V^T + c].
  void linear_pair_fwd(const Tensor& cols, bool r_zero, int64_t M, const Tensor& Wm, const Tensor& Vm, const Tensor& b,
                       const Tensor& c, Tensor& out) const;
  // Weight (and bias) gradients and their tangents from the pair gradient Gm (2M, O) and the operand cols.
  void linear_pair_params(const Tensor& Gm, const Tensor& cols, bool r_zero, int64_t M, bool has_bias, Tensor* gW,
                          Tensor* rgW, Tensor* gb, Tensor* rgb) const;
  // Input-gradient pair [g W; R{g} W + g V] (2M, K) into gc.
  void linear_pair_input(const Tensor& Gm, int64_t M, const Tensor& Wm, const Tensor& Vm, Tensor& gc) const;
};

void Sweep::linear_pair_fwd(const Tensor& cols, bool r_zero, int64_t M, const Tensor& Wm, const Tensor& Vm,
                            const Tensor& b, const Tensor& c, Tensor& out) const {
  Tensor out_p = out.narrow(0, 0, M), out_r = out.narrow(0, M, M);
  if (!r_zero) {
    at::mm_out(out, cols, Wm.t());  // [a; R{a}] W^T: primal and half of the tangent in one GEMM
    out_r.addmm_(cols.narrow(0, 0, M), Vm.t());
  } else {
    at::mm_out(out_p, cols, Wm.t());
    at::mm_out(out_r, cols, Vm.t());
  }
  if (b.defined()) out_p.add_(b);
  if (c.defined()) out_r.add_(c);
}

void Sweep::linear_pair_params(const Tensor& Gm, const Tensor& cols, bool r_zero, int64_t M, bool has_bias, Tensor* gW,
                               Tensor* rgW, Tensor* gb, Tensor* rgb) const {
  Tensor g = Gm.narrow(0, 0, M), rg = Gm.narrow(0, M, M);
  Tensor cols_a = cols.narrow(0, 0, M);
  *gW = at::mm(g.t(), cols_a);
  *rgW = at::mm(rg.t(), cols_a);
  if (!r_zero) rgW->addmm_(g.t(), cols.narrow(0, M, M));  // + g^T R{a}
  if (has_bias) {
    if (nhwc_) {  // CPU: one pass over both halves, double accumulation
      std::tie(*gb, *rgb) = colsum_pair(Gm, M);
    } else {
      *gb = g.sum(0);
      *rgb = rg.sum(0);
    }
  }
}

void Sweep::linear_pair_input(const Tensor& Gm, int64_t M, const Tensor& Wm, const Tensor& Vm, Tensor& gc) const {
  at::mm_out(gc, Gm, Wm);  // [g; R{g}] W: input gradient and half of its tangent in one GEMM
  gc.narrow(0, M, M).addmm_(Gm.narrow(0, 0, M), Vm);
}

Act Sweep::forward(const Layer& L, const Act& a, Saved& s, bool keep_cols) {
  s.in = a;
  const auto& I = L.ints;
  const Tensor& t = a.t;
  const auto opts = t.options();
  switch (L.kind) {
    case kNormalize: {
      const Tensor& mean = buffers_[L.b0];
      const Tensor& sd = buffers_[L.b0 + 1];
      TORCH_CHECK(t.dim() == 4, "hvp_sequential: Normalize expects a 4-D input, got ", t.sizes());
      TORCH_CHECK(mean.numel() == C_of(t), "hvp_sequential: Normalize has ", mean.numel(), " channels, input has ",
                  C_of(t));
      Tensor m = chan(mean, 4), d = chan(sd, 4);
      Tensor out = alloc(t.sizes(), opts, &s);
      Tensor out_p = a.r_zero ? out : out.narrow(0, 0, B_);
      at::sub_out(out_p, primal(a), m);
      out_p.div_(d);
      if (!a.r_zero) {
        Tensor out_r = out.narrow(0, B_, B_);
        at::div_out(out_r, tangent(a), d);
      }
      return {out, a.r_zero};
    }
    case kLinear: {
      TORCH_CHECK(t.dim() == 2, "hvp_sequential: Linear expects a 2-D input (use Flatten), got ", t.sizes());
      const Tensor& W = params_[L.p0];
      TORCH_CHECK(W.size(1) == t.size(1), "hvp_sequential: Linear has in_features ", W.size(1), ", input has ",
                  t.size(1));
      Tensor b = I[0] ? params_[L.p0 + 1] : Tensor(), c = I[0] ? tangents_[L.p0 + 1] : Tensor();
      Tensor out = alloc({2 * B_, W.size(0)}, opts, &s);
      linear_pair_fwd(t, a.r_zero, B_, W, tangents_[L.p0], b, c, out);
      return {out, false};
    }
    case kConv2d: {
      TORCH_CHECK(t.dim() == 4, "hvp_sequential: Conv2d expects a 4-D input, got ", t.sizes());
      const Tensor& W = params_[L.p0];
      const Tensor& V = tangents_[L.p0];
      const int64_t O = W.size(0), C = W.size(1), kh = W.size(2), kw = W.size(3);
      TORCH_CHECK(C == C_of(t), "hvp_sequential: Conv2d has ", C, " input channels, input has ", C_of(t));
      const bool has_bias = I[0] != 0;
      Tensor b = has_bias ? params_[L.p0 + 1] : Tensor(), c = has_bias ? tangents_[L.p0 + 1] : Tensor();
      const int64_t sh = I[1], sw = I[2], ph = I[3], pw = I[4], dh = I[5], dw = I[6];
      const int64_t H = H_of(t), Wd = W_of(t);
      const int64_t Ho = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, Wo = (Wd + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
      TORCH_CHECK(H + 2 * ph - dh * (kh - 1) - 1 >= 0 && Wd + 2 * pw - dw * (kw - 1) - 1 >= 0,
                  "hvp_sequential: Conv2d input ", H, "x", Wd, " is too small for its kernel");
      std::vector<int64_t> st{sh, sw}, pd{ph, pw}, dl{dh, dw}, op{0, 0};
      if (nhwc_ && !im2col_) {
        // ATen (oneDNN) convolutions on channels-last views of the NHWC activations
        Tensor tv = t.permute({0, 3, 1, 2});
        Tensor out;
        if (!a.r_zero) {
          out = nhwc_view(at::convolution(tv, W, {}, st, pd, dl, false, op, 1));  // [a; R{a}] * W at once
          out.narrow(0, B_, B_).add_(nhwc_view(at::convolution(tv.narrow(0, 0, B_), V, {}, st, pd, dl, false, op, 1)));
        } else {  // one convolution with the stacked weights [W; V]: [z | R{z}] per pixel
          Tensor y2 = nhwc_view(at::convolution(tv, at::cat({W, V}), {}, st, pd, dl, false, op, 1));
          out = alloc({2 * B_, Ho, Wo, O}, opts, &s);
          out.narrow(0, 0, B_).copy_(y2.narrow(3, 0, O));
          out.narrow(0, B_, B_).copy_(y2.narrow(3, O, O));
        }
        if (has_bias) {
          out.narrow(0, 0, B_).add_(b);
          out.narrow(0, B_, B_).add_(c);
        }
        return {out, false};
      }
      if (nhwc_) {
        const int64_t N = t.size(0), M = B_ * Ho * Wo, K = kh * kw * C;
        Tensor cols = alloc({N * Ho * Wo, K}, opts, keep_cols ? &s : nullptr);
        im2col_nhwc(t, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, cols);
        Tensor Wm = W.permute({0, 2, 3, 1}).reshape({O, K});
        Tensor Vm = V.permute({0, 2, 3, 1}).reshape({O, K});
        Tensor out = alloc({2 * M, O}, opts, &s);
        linear_pair_fwd(cols, a.r_zero, M, Wm, Vm, b, c, out);
        if (keep_cols)
          s.aux = cols;
        else
          release(cols);
        return {out.view({2 * B_, Ho, Wo, O}), false};
      }
      if (!a.r_zero) {
        Tensor out = at::convolution(t, W, {}, st, pd, dl, false, op, 1);  // [a; R{a}] * W in one convolution
        if (has_bias) out.narrow(0, 0, B_).add_(b.view({1, O, 1, 1}));
        out.narrow(0, B_, B_).add_(at::convolution(primal(a), V, c, st, pd, dl, false, op, 1));
        return {out, false};
      }
      return {at::cat({at::convolution(t, W, b, st, pd, dl, false, op, 1),
                       at::convolution(t, V, c, st, pd, dl, false, op, 1)}),
              false};
    }
    case kReLU: {
      // in place: no layer needs its own output in the backward sweep except ReLU, which keeps it as its mask
      Tensor u = t.is_contiguous() ? t : t.contiguous();
      if (a.r_zero) {
        u.relu_();
        s.aux = u;
        return {u, true};
      }
      call_relu_rop_(u);
      s.aux = u.narrow(0, 0, B_);
      return {u, false};
    }
    case kMaxPool2d: {
      TORCH_CHECK(t.dim() == 4, "hvp_sequential: MaxPool2d expects a 4-D input, got ", t.sizes());
      const int64_t kh = I[0], kw = I[1], sh = I[2], sw = I[3], ph = I[4], pw = I[5], dh = I[6], dw = I[7];
      const bool ceil = I[8] != 0;
      TORCH_CHECK(kh / 2 >= ph && kw / 2 >= pw, "hvp_sequential: MaxPool2d padding must be at most half the kernel");
      const int64_t Ho = pooling_out_size(H_of(t), kh, ph, sh, dh, ceil), Wo = pooling_out_size(W_of(t), kw, pw, sw, dw, ceil);
      TORCH_CHECK(Ho > 0 && Wo > 0, "hvp_sequential: MaxPool2d input ", H_of(t), "x", W_of(t), " is too small");
      if (nhwc_) {
        const int64_t C = t.size(3);
        Tensor out = alloc({t.size(0), Ho, Wo, C}, opts, &s);
        Tensor index = alloc({B_, Ho, Wo, C}, opts.dtype(at::kLong), &s);
        maxpool_pair_nhwc(t, B_, kh, kw, sh, sw, ph, pw, dh, dw, out, index);
        s.aux = index;
        return {out, a.r_zero};
      }
      auto [out_p, index] = at::max_pool2d_with_indices(primal(a), {kh, kw}, {sh, sw}, {ph, pw}, {dh, dw}, ceil);
      s.aux = index;
      if (a.r_zero) return {out_p, true};
      Tensor out_r = tangent(a).flatten(2).gather(2, index.flatten(2)).view_as(out_p);
      return {at::cat({out_p, out_r}), false};
    }
    case kAvgPool2d: {
      TORCH_CHECK(t.dim() == 4, "hvp_sequential: AvgPool2d expects a 4-D input, got ", t.sizes());
      const int64_t kh = I[0], kw = I[1], sh = I[2], sw = I[3], ph = I[4], pw = I[5];
      const bool ceil = I[6] != 0, cip = I[7] != 0;
      const int64_t div = I[8];
      TORCH_CHECK(kh / 2 >= ph && kw / 2 >= pw, "hvp_sequential: AvgPool2d padding must be at most half the kernel");
      const int64_t Ho = pooling_out_size(H_of(t), kh, ph, sh, 1, ceil), Wo = pooling_out_size(W_of(t), kw, pw, sw, 1, ceil);
      TORCH_CHECK(Ho > 0 && Wo > 0, "hvp_sequential: AvgPool2d input ", H_of(t), "x", W_of(t), " is too small");
      if (nhwc_) {
        Tensor out = alloc({t.size(0), Ho, Wo, t.size(3)}, opts, &s);
        avgpool_nhwc(t, kh, kw, sh, sw, ph, pw, cip, div, out);
        return {out, a.r_zero};
      }
      std::optional<int64_t> dv = div > 0 ? std::optional<int64_t>(div) : std::nullopt;
      return {at::avg_pool2d(t, {kh, kw}, {sh, sw}, {ph, pw}, ceil, cip, dv), a.r_zero};
    }
    case kFlatten: {
      if (t.dim() == 2) return a;
      const int64_t N = t.size(0);
      if (nhwc_ && t.dim() == 4) {  // back to PyTorch's (C, H, W) feature order
        Tensor out = alloc({N, t.numel() / N}, opts, &s);
        out.view({N, t.size(3), t.size(1), t.size(2)}).copy_(t.permute({0, 3, 1, 2}));
        return {out, a.r_zero};
      }
      return {t.reshape({N, -1}), a.r_zero};
    }
    case kBatchNorm: {
      TORCH_CHECK(t.dim() == 2 || t.dim() == 4, "hvp_sequential: BatchNorm expects a 2-D or 4-D input, got ", t.sizes());
      const int64_t nd = t.dim();
      const int64_t C = nd == 2 ? t.size(1) : C_of(t);
      TORCH_CHECK(buffers_[L.b0].numel() == C, "hvp_sequential: BatchNorm has ", buffers_[L.b0].numel(),
                  " channels, input has ", C);
      const bool affine = I[0] != 0;
      if (nhwc_) {  // channels are the last dimension for both 2-D and NHWC 4-D activations
        Tensor out = alloc(full_sizes(a), opts, &s);
        batchnorm_pair_nhwc(t, B_, buffers_[L.b0], buffers_[L.b0 + 1], affine ? params_[L.p0] : Tensor(),
                            affine ? params_[L.p0 + 1] : Tensor(), affine ? tangents_[L.p0] : Tensor(),
                            affine ? tangents_[L.p0 + 1] : Tensor(), out);
        return {out, false};
      }
      Tensor mu = chan(buffers_[L.b0], nd), is = chan(buffers_[L.b0 + 1], nd);
      Tensor ahat = (primal(a) - mu) * is;
      if (!affine) {
        if (a.r_zero) return {ahat, true};
        return {at::cat({ahat, tangent(a) * is}), false};
      }
      Tensor gam = chan(params_[L.p0], nd), bet = chan(params_[L.p0 + 1], nd);
      Tensor vg = chan(tangents_[L.p0], nd), vb = chan(tangents_[L.p0 + 1], nd);
      Tensor out = at::empty(full_sizes(a), opts);
      Tensor p = out.narrow(0, 0, B_), r = out.narrow(0, B_, B_);
      at::add_out(p, bet, ahat * gam);
      at::add_out(r, vb, ahat * vg);
      if (!a.r_zero) r.add_(tangent(a) * (is * gam));
      return {out, false};
    }
    default:
      TORCH_CHECK(false, "hvp_sequential: unknown layer kind ", L.kind);
  }
}

Tensor Sweep::backward(const Layer& L, Saved& s, Tensor G, bool want_params, bool want_input,
                       std::vector<Tensor>& grads, std::vector<Tensor>& hvs) {
  const auto& I = L.ints;
  const Act& a = s.in;
  const Tensor& t = a.t;
  const auto opts = G.options();
  switch (L.kind) {
    case kNormalize: {
      if (!want_input) return Tensor();
      Tensor gi = alloc(G.sizes(), opts);
      at::div_out(gi, G, chan(buffers_[L.b0 + 1], 4));
      return gi;
    }
    case kLinear:
    case kConv2d: {
      const Tensor& W = params_[L.p0];
      const Tensor& V = tangents_[L.p0];
      const bool has_bias = I[0] != 0;
      Tensor gW, rgW, gb, rgb, gi;
      if (L.kind == kLinear) {
        if (want_params) linear_pair_params(G, t, a.r_zero, B_, has_bias, &gW, &rgW, &gb, &rgb);
        if (want_input) {
          gi = alloc({2 * B_, W.size(1)}, opts);
          linear_pair_input(G, B_, W, V, gi);
        }
      } else {
        const int64_t O = W.size(0), C = W.size(1), kh = W.size(2), kw = W.size(3);
        const int64_t sh = I[1], sw = I[2], ph = I[3], pw = I[4], dh = I[5], dw = I[6];
        if (nhwc_ && !im2col_) {
          std::vector<int64_t> st{sh, sw}, pd{ph, pw}, dl{dh, dw}, op{0, 0};
          const int64_t Ho = G.size(1), Wo = G.size(2), M = B_ * Ho * Wo;
          Tensor Gv = G.permute({0, 3, 1, 2});  // channels-last view
          Tensor tv = t.permute({0, 3, 1, 2});
          if (want_params) {
            Tensor g = Gv.narrow(0, 0, B_), rg = Gv.narrow(0, B_, B_), av = tv.narrow(0, 0, B_);
            gW = std::get<1>(at::convolution_backward(g, av, W, std::nullopt, st, pd, dl, false, op, 1, {false, true, false}));
            rgW = std::get<1>(at::convolution_backward(rg, av, W, std::nullopt, st, pd, dl, false, op, 1, {false, true, false}));
            if (!a.r_zero)
              rgW.add_(std::get<1>(at::convolution_backward(g, tv.narrow(0, B_, B_), W, std::nullopt, st, pd, dl, false, op,
                                                            1, {false, true, false})));
            gW = gW.contiguous();
            rgW = rgW.contiguous();
            if (has_bias) std::tie(gb, rgb) = colsum_pair(G.view({2 * M, O}), M);
          }
          if (want_input) {
            // input gradients as transposed convolutions (the adjoint of the forward one): oneDNN runs these
            // faster than its backward-data primitive, notably for few input channels
            const int64_t H = H_of(t), Wd = W_of(t);
            std::vector<int64_t> opad{H - ((Ho - 1) * sh - 2 * ph + dh * (kh - 1) + 1),
                                      Wd - ((Wo - 1) * sw - 2 * pw + dw * (kw - 1) + 1)};
            gi = nhwc_view(at::convolution(Gv, W, {}, st, pd, dl, true, opad, 1));  // [g; R{g}] W^T at once
            gi.narrow(0, B_, B_).add_(nhwc_view(at::convolution(Gv.narrow(0, 0, B_), V, {}, st, pd, dl, true, opad, 1)));
          }
        } else if (nhwc_) {
          const int64_t Ho = G.size(1), Wo = G.size(2);
          const int64_t M = B_ * Ho * Wo, K = kh * kw * C;
          Tensor Gm = G.view({2 * M, O});
          if (want_params) {
            Tensor cols = s.aux;
            if (!cols.defined()) {
              cols = alloc({t.size(0) * Ho * Wo, K}, opts);
              im2col_nhwc(t, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, cols);
            }
            linear_pair_params(Gm, cols, a.r_zero, M, has_bias, &gW, &rgW, &gb, &rgb);
            gW = gW.view({O, kh, kw, C}).permute({0, 3, 1, 2}).contiguous();
            rgW = rgW.view({O, kh, kw, C}).permute({0, 3, 1, 2}).contiguous();
            s.aux = Tensor();
            release(cols);  // its buffer takes the input-gradient columns next
          }
          if (want_input) {
            Tensor Wm = W.permute({0, 2, 3, 1}).reshape({O, K});
            Tensor Vm = V.permute({0, 2, 3, 1}).reshape({O, K});
            Tensor gc = alloc({2 * M, K}, opts);
            linear_pair_input(Gm, M, Wm, Vm, gc);
            gi = alloc(full_sizes(a), opts);
            col2im_nhwc(gc, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, gi);
            release(gc);
          }
        } else {
          std::vector<int64_t> st{sh, sw}, pd{ph, pw}, dl{dh, dw}, op{0, 0};
          std::vector<int64_t> bias_sizes{O};
          if (want_input) {
            // [g; R{g}] through W^T in one transposed convolution, plus g through V^T.
            Tensor in_full = a.r_zero ? at::empty(full_sizes(a), t.options()) : t;
            gi = std::get<0>(at::convolution_backward(G, in_full, W, std::nullopt, st, pd, dl, false, op, 1,
                                                      {true, false, false}));
            gi.narrow(0, B_, B_).add_(std::get<0>(at::convolution_backward(top(G), primal(a), V, std::nullopt, st, pd,
                                                                           dl, false, op, 1, {true, false, false})));
          }
          if (want_params) {
            auto r0 = at::convolution_backward(top(G), primal(a), W, bias_sizes, st, pd, dl, false, op, 1,
                                               {false, true, has_bias});
            auto r1 = at::convolution_backward(bot(G), primal(a), W, bias_sizes, st, pd, dl, false, op, 1,
                                               {false, true, has_bias});
            gW = std::get<1>(r0);
            rgW = std::get<1>(r1);
            if (has_bias) {
              gb = std::get<2>(r0);
              rgb = std::get<2>(r1);
            }
            if (!a.r_zero)
              rgW.add_(std::get<1>(at::convolution_backward(top(G), tangent(a), W, std::nullopt, st, pd, dl, false, op,
                                                            1, {false, true, false})));
          }
        }
      }
      if (want_params) {
        grads[L.p0] = gW;
        hvs[L.p0] = rgW;
        if (has_bias) {
          grads[L.p0 + 1] = gb;
          hvs[L.p0 + 1] = rgb;
        }
      }
      return gi;
    }
    case kReLU: {
      if (!want_input) return Tensor();
      Tensor g = G.is_contiguous() ? G : G.contiguous();
      call_relu_rop_backward_(s.aux, g);  // in place: G is dead after this layer
      return g;
    }
    case kMaxPool2d: {
      if (!want_input) return Tensor();
      const int64_t kh = I[0], kw = I[1], sh = I[2], sw = I[3], ph = I[4], pw = I[5], dh = I[6], dw = I[7];
      if (nhwc_) {
        Tensor gi = alloc(full_sizes(a), opts);
        maxpool_pair_nhwc_backward(G.contiguous(), s.aux, gi);
        return gi;
      }
      Tensor in_full = a.r_zero ? at::empty(full_sizes(a), t.options()) : t;
      return at::max_pool2d_with_indices_backward(G, in_full, {kh, kw}, {sh, sw}, {ph, pw}, {dh, dw}, I[8] != 0,
                                                  at::cat({s.aux, s.aux}));
    }
    case kAvgPool2d: {
      if (!want_input) return Tensor();
      const int64_t kh = I[0], kw = I[1], sh = I[2], sw = I[3], ph = I[4], pw = I[5];
      const bool ceil = I[6] != 0, cip = I[7] != 0;
      const int64_t div = I[8];
      if (nhwc_) {
        Tensor gi = alloc(full_sizes(a), opts);
        avgpool_nhwc_backward(G.contiguous(), kh, kw, sh, sw, ph, pw, cip, div, gi);
        return gi;
      }
      std::optional<int64_t> dv = div > 0 ? std::optional<int64_t>(div) : std::nullopt;
      Tensor in_full = a.r_zero ? at::empty(full_sizes(a), t.options()) : t;
      return at::avg_pool2d_backward(G, in_full, {kh, kw}, {sh, sw}, {ph, pw}, ceil, cip, dv);
    }
    case kFlatten: {
      if (!want_input) return Tensor();
      if (t.dim() == 2) return G;
      auto sz = full_sizes(a);
      if (nhwc_ && t.dim() == 4) {
        Tensor gi = alloc(sz, opts);
        gi.copy_(G.view({sz[0], sz[3], sz[1], sz[2]}).permute({0, 2, 3, 1}));
        return gi;
      }
      return G.reshape(sz);
    }
    case kBatchNorm: {
      const int64_t nd = t.dim();
      const bool affine = I[0] != 0;
      if (nhwc_) {
        Tensor gi;
        if (want_input) gi = alloc(full_sizes(a), opts);
        auto sums = batchnorm_pair_nhwc_backward(G.contiguous(), t, B_, buffers_[L.b0], buffers_[L.b0 + 1],
                                                 affine ? params_[L.p0] : Tensor(), affine ? tangents_[L.p0] : Tensor(),
                                                 want_params, want_input ? &gi : nullptr);
        if (affine && want_params) {
          grads[L.p0] = sums[0];
          grads[L.p0 + 1] = sums[1];
          hvs[L.p0] = sums[2];
          hvs[L.p0 + 1] = sums[3];
        }
        return gi;
      }
      Tensor is = chan(buffers_[L.b0 + 1], nd);
      Tensor g = top(G), rg = bot(G);
      if (affine && want_params) {
        auto dims = chan_reduce_dims(nd);
        Tensor ahat = (primal(a) - chan(buffers_[L.b0], nd)) * is;
        grads[L.p0] = (g * ahat).sum(dims);
        grads[L.p0 + 1] = g.sum(dims);
        Tensor rgg = (rg * ahat).sum(dims);
        if (!a.r_zero) rgg.add_((g * tangent(a)).sum(dims) * buffers_[L.b0 + 1]);
        hvs[L.p0] = rgg;
        hvs[L.p0 + 1] = rg.sum(dims);
      }
      if (!want_input) return Tensor();
      if (!affine) return G * is;
      Tensor gi = G * (is * chan(params_[L.p0], nd));
      gi.narrow(0, B_, B_).add_(g * (is * chan(tangents_[L.p0], nd)));
      return gi;
    }
    default:
      TORCH_CHECK(false, "hvp_sequential: unknown layer kind ", L.kind);
  }
}

std::vector<Layer> parse_spec(at::IntArrayRef spec, int64_t num_params, int64_t num_buffers) {
  std::vector<Layer> layers;
  int64_t pos = 0, p = 0, b = 0;
  const int64_t n = static_cast<int64_t>(spec.size());
  while (pos < n) {
    Layer L;
    L.kind = spec[pos++];
    int64_t nints = 0;
    switch (L.kind) {
      case kNormalize: L.nb = 2; break;
      case kLinear: nints = 1; break;
      case kConv2d: nints = 7; break;
      case kReLU: break;
      case kMaxPool2d: nints = 9; break;
      case kAvgPool2d: nints = 9; break;
      case kFlatten: break;
      case kBatchNorm: nints = 1; L.nb = 2; break;
      default: TORCH_CHECK(false, "hvp_sequential: spec entry ", pos - 1, " has unknown layer kind ", L.kind);
    }
    TORCH_CHECK(pos + nints <= n, "hvp_sequential: spec ends inside a ", kind_name(L.kind), " entry");
    L.ints.assign(spec.begin() + pos, spec.begin() + pos + nints);
    pos += nints;
    if (L.kind == kLinear || L.kind == kConv2d) L.np = 1 + (L.ints[0] != 0);
    if (L.kind == kBatchNorm) L.np = L.ints[0] != 0 ? 2 : 0;
    if (L.kind == kConv2d || L.kind == kMaxPool2d || L.kind == kAvgPool2d) {
      const int64_t first = L.kind == kConv2d ? 1 : 2;  // strides start at ints[first]
      for (int64_t k = first; k < first + 2; ++k)
        TORCH_CHECK(L.ints[k] >= 1, "hvp_sequential: ", kind_name(L.kind), " stride must be >= 1");
      for (int64_t k = first + 2; k < first + 4; ++k)
        TORCH_CHECK(L.ints[k] >= 0, "hvp_sequential: ", kind_name(L.kind), " padding must be >= 0");
      if (L.kind != kAvgPool2d)
        for (int64_t k = first + 4; k < first + 6; ++k)
          TORCH_CHECK(L.ints[k] >= 1, "hvp_sequential: ", kind_name(L.kind), " dilation must be >= 1");
      if (L.kind != kConv2d) TORCH_CHECK(L.ints[0] >= 1 && L.ints[1] >= 1, "hvp_sequential: pooling kernel must be >= 1");
    }
    L.p0 = p;
    L.b0 = b;
    p += L.np;
    b += L.nb;
    layers.push_back(std::move(L));
  }
  TORCH_CHECK(p == num_params, "hvp_sequential: the spec uses ", p, " parameters, ", num_params, " were given");
  TORCH_CHECK(b == num_buffers, "hvp_sequential: the spec uses ", b, " buffers, ", num_buffers, " were given");
  return layers;
}

constexpr int64_t kColsCacheBytes = int64_t(1) << 30;  // keep im2col matrices up to 1 GiB in total

// Marks the workspace free at the end of the call, also when an error leaves the sweep early.
struct WorkspaceCall {
  Workspace* ws;
  ~WorkspaceCall() {
    if (ws != nullptr) ws->end_call();
  }
};

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> hvp_sequential(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& weights, at::TensorList params,
    at::TensorList tangents, at::TensorList buffers, at::IntArrayRef spec, bool want_param_grads, bool want_mixed,
    int64_t algo, const std::optional<at::Tensor>& logit_grad, const std::optional<at::Tensor>& logit_hess) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "hvp_sequential: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2 && x.size(0) > 0, "hvp_sequential: x must have shape (B, ...) with B >= 1, got ", x.sizes());
  const int64_t B = x.size(0);
  TORCH_CHECK(y.dim() == 1 && y.size(0) == B && y.scalar_type() == at::kLong, "hvp_sequential: y must be int64 of shape (",
              B, ",), got ", y.scalar_type(), " ", y.sizes());
  TORCH_CHECK(y.device() == x.device(), "hvp_sequential: y is on ", y.device(), ", x on ", x.device());
  if (weights.has_value()) {
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == B, "hvp_sequential: weights must have shape (", B, ",), got ",
                weights->sizes());
    TORCH_CHECK(weights->scalar_type() == x.scalar_type() && weights->device() == x.device(),
                "hvp_sequential: weights must have x's dtype and device");
  }
  TORCH_CHECK(params.size() == tangents.size(), "hvp_sequential: ", params.size(), " parameters but ", tangents.size(),
              " tangents");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].scalar_type() == x.scalar_type() && params[i].device() == x.device(),
                "hvp_sequential: parameter ", i, " must have x's dtype and device");
    TORCH_CHECK(tangents[i].sizes() == params[i].sizes(), "hvp_sequential: tangent ", i, " has shape ", tangents[i].sizes(),
                ", its parameter ", params[i].sizes());
    TORCH_CHECK(tangents[i].scalar_type() == x.scalar_type() && tangents[i].device() == x.device(),
                "hvp_sequential: tangent ", i, " must have x's dtype and device");
  }
  for (size_t i = 0; i < buffers.size(); ++i)
    TORCH_CHECK(buffers[i].scalar_type() == x.scalar_type() && buffers[i].device() == x.device() && buffers[i].dim() == 1,
                "hvp_sequential: buffer ", i, " must be 1-D with x's dtype and device");
  TORCH_CHECK(algo >= kAlgoAuto && algo <= kAlgoNhwc, "hvp_sequential: unknown algo ", algo);
  if (algo == kAlgoAuto) algo = x.is_cpu() ? kAlgoNhwc : kAlgoAten;
  TORCH_CHECK(algo == kAlgoAten || x.is_cpu(), "hvp_sequential: the NHWC algorithms (gemm, nhwc) are CPU only");
  const bool nhwc = algo == kAlgoGemm || algo == kAlgoNhwc;

  std::vector<Tensor> P, T, Bf;
  for (const auto& p : params) P.push_back(p.contiguous());
  for (const auto& v : tangents) T.push_back(v.contiguous());
  for (const auto& b : buffers) Bf.push_back(b.contiguous());
  const auto layers = parse_spec(spec, static_cast<int64_t>(P.size()), static_cast<int64_t>(Bf.size()));
  Workspace* ws = nhwc ? &cpu_workspace() : nullptr;
  WorkspaceCall call_guard{ws};
  Sweep sweep(B, nhwc, algo == kAlgoGemm, ws, P, T, Bf);

  // forward + R-forward (on a private copy of x: some layers work in place)
  Act cur;
  if (nhwc && x.dim() == 4) {
    cur.t = sweep.alloc({B, x.size(2), x.size(3), x.size(1)}, x.options());
    cur.t.copy_(x.permute({0, 2, 3, 1}));
  } else {
    cur.t = sweep.alloc(x.sizes(), x.options());
    cur.t.copy_(x);
  }
  const Tensor x_buffer = cur.t;
  std::vector<Saved> saved(layers.size());
  int64_t cols_bytes = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    bool keep = false;
    if (algo == kAlgoGemm && want_param_grads && layers[l].kind == kConv2d) {
      const Tensor& W = P[layers[l].p0];
      // im2col bytes of this layer (upper bound from the input size and the kernel area)
      const int64_t bytes = cur.t.numel() * W.size(2) * W.size(3) * cur.t.element_size();
      keep = cols_bytes + bytes <= kColsCacheBytes;
      if (keep) cols_bytes += bytes;
    }
    cur = sweep.forward(layers[l], cur, saved[l], keep);
  }
  TORCH_CHECK(cur.t.dim() == 2, "hvp_sequential: the network must end in (B, classes) logits, got ", cur.t.sizes());
  Tensor logits = cur.r_zero ? at::cat({cur.t, at::zeros_like(cur.t)}) : cur.t;
  Tensor loss, G;
  if (logit_grad.has_value() || logit_hess.has_value()) {
    // a loss given by its expansion at the logits: dL/dz = g, R{dL/dz} = H R{z} block by block
    TORCH_CHECK(logit_grad.has_value() && logit_hess.has_value(), "hvp_sequential: logit_grad and logit_hess go together");
    const Tensor& g = *logit_grad;
    const Tensor& H = *logit_hess;
    const int64_t K = logits.size(1);
    TORCH_CHECK(g.dim() == 2 && g.size(0) == B && g.size(1) == K, "hvp_sequential: logit_grad must be (", B, ", ", K,
                ") like the logits, got ", g.sizes());
    TORCH_CHECK(H.dim() == 3 && H.size(1) == H.size(2) && H.size(1) > 0 && H.size(1) % K == 0 &&
                    H.size(0) * (H.size(1) / K) == B,
                "hvp_sequential: logit_hess must be (G, m * ", K, ", m * ", K, ") with G * m = ", B, ", got ", H.sizes());
    for (const Tensor* t : {&g, &H})
      TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                  "hvp_sequential: logit_grad / logit_hess must have x's dtype and device");
    const Tensor rz = logits.narrow(0, B, B).contiguous().view({H.size(0), H.size(1), 1});
    G = at::cat({g.contiguous(), at::bmm(H.contiguous(), rz).view({B, K})});
    loss = at::zeros({}, x.options());
  } else {
    std::tie(loss, G) = call_softmax_xent_rop(logits, y, weights);
  }

  std::vector<Tensor> grads(want_param_grads ? P.size() : 0), hvs(want_param_grads ? P.size() : 0);
  Tensor mixed = at::empty({0}, x.options());
  int64_t lowest = static_cast<int64_t>(layers.size());
  for (size_t l = 0; l < layers.size(); ++l)
    if (layers[l].np > 0) {
      lowest = static_cast<int64_t>(l);
      break;
    }
  if (want_param_grads || want_mixed) {
    const int64_t stop = want_mixed ? 0 : lowest;
    for (int64_t l = static_cast<int64_t>(layers.size()) - 1; l >= stop && l >= 0; --l) {
      const bool want_input = want_mixed || l > lowest;
      Tensor next = sweep.backward(layers[l], saved[l], G, want_param_grads, want_input, grads, hvs);
      // buffers dead from here on: the incoming gradient (unless worked on in place) and this layer's own
      if (!next.defined() || !next.is_alias_of(G)) sweep.release(G);
      for (const auto& t : saved[l].own) sweep.release(t);
      saved[l] = Saved();
      G = next;
    }
    if (want_mixed) {
      Tensor r = G.narrow(0, B, B);
      mixed = (nhwc && x.dim() == 4) ? r.permute({0, 3, 1, 2}).contiguous() : r.reshape(x.sizes()).clone();
    }
  }
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) {  // not reached by the backward sweep (cannot happen for a valid spec)
      grads[i] = at::zeros_like(P[i]);
      hvs[i] = at::zeros_like(P[i]);
    }
    grads[i] = grads[i].reshape(P[i].sizes()).contiguous();
    hvs[i] = hvs[i].reshape(P[i].sizes()).contiguous();
  }
  (void)x_buffer;
  return {loss, grads, hvs, mixed};
}

}  // namespace engine_hvp
