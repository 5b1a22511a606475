"""Hessian-vector products and the mixed term: fused op (every algorithm) against torch.func, double
backward and finite differences; fallback, validation, op checks (engine.hessian, csrc/hvp_*)."""

import warnings

import pytest
import torch
from torch import nn

import engine
from engine import _ext, hessian, models

needs_ext = pytest.mark.skipif(not _ext.available(), reason="engine._C is not built")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_cuda_ops()), reason="needs a CUDA device and engine._C built with CUDA"
)
CPU_ALGOS = ("aten", "gemm", "nhwc")


def rel(a, b) -> float:
    """Relative error ||a - b|| / ||b|| of tensors or per-parameter sequences."""
    a = hessian.flatten(a) if isinstance(a, (tuple, list)) else a.reshape(-1)
    b = hessian.flatten(b) if isinstance(b, (tuple, list)) else b.reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
    return model


def odd_convnet() -> nn.Sequential:
    """(B, 2, 7, 9) -> 3 classes: stride 2, padding, dilation, non-square kernel, ceil-mode pools, BN eval,
    nested Sequential, bias-free conv, Dropout (eval) and Identity."""
    return nn.Sequential(
        models.Normalize((0.5, 0.4), (0.3, 0.2)),
        nn.Conv2d(2, 5, 3, stride=2, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(5, 6, (3, 2), padding=(1, 0), dilation=(1, 2), bias=False), nn.ReLU()),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(54, 7),
        nn.BatchNorm1d(7),
        nn.Identity(),
        nn.ReLU(),
        nn.Linear(7, 3),
    )


def odd_convnet2() -> nn.Sequential:
    """(B, 3, 13, 6) -> 4 classes: padded max pool, a stride-2 conv that leaves a row unused (its adjoint needs
    output padding), avg pool with divisor, non-affine BN."""
    return nn.Sequential(
        models.Normalize((0.1, 0.2, 0.3), (0.9, 0.8, 0.7)),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1, dilation=1),
        nn.Conv2d(4, 5, 2, stride=(2, 1)),
        nn.BatchNorm2d(5, affine=False),
        nn.ReLU(),
        nn.AvgPool2d((2, 1), stride=1, divisor_override=3),
        nn.Flatten(),
        nn.Linear(5 * 1 * 4, 4),
    )


ARCHS = {
    "lenet": (models.lenet_mnist, (1, 28, 28), 10),
    "mlp": (lambda: models.mlp_mnist(hidden=37), (1, 28, 28), 10),
    "odd": (odd_convnet, (2, 7, 9), 3),
    "odd2": (odd_convnet2, (3, 13, 6), 4),
}


def make_case(arch: str, dtype=torch.float64, batch: int = 5, device="cpu", weighted: bool = True):
    build, shape, classes = ARCHS[arch]
    model = _randomise_batchnorm(build()).to(device=device, dtype=dtype).eval()
    x = torch.rand((batch,) + shape, dtype=dtype, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    v = [torch.randn_like(p) for p in model.parameters()]
    w = torch.rand(batch, dtype=dtype, device=device) + 0.5 if weighted else None
    return model, x, y, v, w


# -- agreement of the backends ------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("weighted", [True, False])
def test_backends_agree_float64(arch, weighted):
    model, x, y, v, w = make_case(arch, weighted=weighted)
    ref = hessian.hvp_torch_func(model, x, y, v, weights=w)
    ref_mixed = hessian.mixed_vjp_torch_func(model, x, y, v, weights=w)
    db = hessian.hvp_double_backward(model, x, y, v, weights=w)
    assert rel(db.loss, ref.loss) < 1e-12
    assert rel(db.grad, ref.grad) < 1e-10 and rel(db.hv, ref.hv) < 1e-10
    assert rel(hessian.mixed_vjp_double_backward(model, x, y, v, weights=w), ref_mixed) < 1e-10
    assert ref_mixed.shape == x.shape and float(ref_mixed.norm()) > 0
    for algo in CPU_ALGOS:
        res = hessian.hvp_fused(model, x, y, v, weights=w, algo=algo)
        assert res.backend == "fused"
        assert rel(res.loss, ref.loss) < 1e-12, algo
        assert rel(res.grad, ref.grad) < 1e-10, algo
        assert rel(res.hv, ref.hv) < 1e-10, algo
        for g, h, p in zip(res.grad, res.hv, model.parameters()):
            assert g.shape == p.shape and h.shape == p.shape and g.dtype == p.dtype
        # per-parameter agreement too (a small parameter could hide in the norm of the whole)
        for h, r in zip(res.hv, ref.hv):
            assert rel(h, r) < 1e-9, algo
        mixed = hessian.mixed_vjp_fused(model, x, y, v, weights=w, algo=algo)
        assert mixed.shape == x.shape
        assert rel(mixed, ref_mixed) < 1e-10, algo


@needs_ext
@pytest.mark.parametrize("arch", ["lenet", "odd"])
def test_fused_with_channels_last_weights(arch):
    """Conv weights in channels-last storage (PACD's and engine.train's CPU layout): same products (float64)."""
    model, x, y, v, w = make_case(arch)
    ref = hessian.hvp_torch_func(model, x, y, v, weights=w)
    ref_mixed = hessian.mixed_vjp_torch_func(model, x, y, v, weights=w)
    model.to(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())
    v_cl = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in v]
    for algo in CPU_ALGOS:
        for tangent in (v, v_cl, hessian.flatten(v)):
            res = hessian.hvp_fused(model, x, y, tangent, weights=w, algo=algo)
            assert rel(res.grad, ref.grad) < 1e-10 and rel(res.hv, ref.hv) < 1e-10, algo
            assert rel(hessian.mixed_vjp_fused(model, x, y, tangent, weights=w, algo=algo), ref_mixed) < 1e-10, algo


@needs_ext
@pytest.mark.parametrize("arch", ["lenet", "odd", "odd2"])
def test_backends_agree_float32(arch):
    model, x, y, v, w = make_case(arch, dtype=torch.float32, batch=6)
    m64 = _to64(model)
    truth = hessian.hvp_torch_func(m64, x.double(), y, [t.double() for t in v], weights=w.double())
    truth_mixed = hessian.mixed_vjp_torch_func(m64, x.double(), y, [t.double() for t in v], weights=w.double())
    tf = hessian.hvp_torch_func(model, x, y, v, weights=w)
    tf_err = max(rel(tf.hv, truth.hv), 1e-7)
    for algo in CPU_ALGOS:
        res = hessian.hvp_fused(model, x, y, v, weights=w, algo=algo)
        assert rel(res.loss.double(), truth.loss) < 1e-5
        assert rel(res.grad, truth.grad) < 1e-4
        assert rel(res.hv, truth.hv) < 1e-4
        assert rel(res.hv, truth.hv) < 50 * tf_err  # about torch.func's own float32 error
        assert rel(hessian.mixed_vjp_fused(model, x, y, v, weights=w, algo=algo), truth_mixed) < 1e-4


def _to64(model):
    import copy

    return copy.deepcopy(model).double()


@needs_ext
def test_public_api_and_flat_tangent():
    model, x, y, v, w = make_case("odd")
    res = engine.hvp(model, x, y, v, weights=w)
    assert res.backend == "fused"
    flat = hessian.flatten(v)
    res_flat = engine.hvp(model, x, y, flat, weights=w, backend="double_backward")
    assert rel(res.hv_flat, res_flat.hv_flat) < 1e-10 and rel(res.grad_flat, res_flat.grad_flat) < 1e-10
    assert res.hv_flat.shape == (sum(p.numel() for p in model.parameters()),)
    back = hessian.unflatten(res.hv_flat, model)
    assert all(torch.equal(a, b) for a, b in zip(back, res.hv))
    mixed = engine.mixed_vjp(model, x, y, v, weights=w)
    assert rel(mixed, engine.mixed_vjp(model, x, y, flat, weights=w, backend="torch_func")) < 1e-10


# -- finite differences ---------------------------------------------------------------------------------------


def _grad_dot(model, x, y, v, w):
    """grad_w L(w, x) . v (float64), by autograd."""
    params = [p for p in model.parameters()]
    with torch.enable_grad():
        loss = hessian._loss(model(x), y, w)
        g = torch.autograd.grad(loss, params)
    return sum(float((a * b).sum()) for a, b in zip(g, v))


@needs_ext
@pytest.mark.parametrize("arch", ["lenet", "odd", "odd2"])
def test_mixed_term_against_finite_differences(arch):
    model, x, y, v, w = make_case(arch, batch=3)
    mixed = engine.mixed_vjp(model, x, y, v, weights=w, backend="fused")
    # directional derivative of grad_w L . v along a random input direction u, central differences
    u = torch.randn_like(x)
    eps = 1e-6
    fd = (_grad_dot(model, x + eps * u, y, v, w) - _grad_dot(model, x - eps * u, y, v, w)) / (2 * eps)
    exact = float((mixed * u).sum())
    assert abs(fd - exact) <= 1e-6 * max(1.0, abs(exact)), (fd, exact)


@needs_ext
def test_hv_against_finite_differences():
    model, x, y, v, w = make_case("odd", batch=4)
    res = engine.hvp(model, x, y, v, weights=w, backend="fused")
    eps = 1e-6
    params = list(model.parameters())

    def grad_at(shift):
        with torch.no_grad():
            for p, t in zip(params, v):
                p.add_(shift * t)
        try:
            return hessian.hvp_double_backward(model, x, y, v, weights=w).grad
        finally:
            with torch.no_grad():
                for p, t in zip(params, v):
                    p.sub_(shift * t)

    fd = [(a - b) / (2 * eps) for a, b in zip(grad_at(eps), grad_at(-eps))]
    assert rel(res.hv, fd) < 1e-6


# -- parameters: frozen, shared --------------------------------------------------------------------------------


@needs_ext
def test_frozen_parameters_are_excluded():
    model, x, y, _, w = make_case("odd")
    model[1].weight.requires_grad_(False)
    model[9].bias.requires_grad_(False)
    names = [n for n, _ in hessian.trainable_parameters(model)]
    assert "1.weight" not in names and "9.bias" not in names
    v = [torch.randn_like(p) for p in model.parameters() if p.requires_grad]
    ref = hessian.hvp_torch_func(model, x, y, v, weights=w)
    for algo in CPU_ALGOS:
        res = hessian.hvp_fused(model, x, y, v, weights=w, algo=algo)
        assert len(res.grad) == len(names) == len(res.hv)
        assert rel(res.hv, ref.hv) < 1e-10 and rel(res.grad, ref.grad) < 1e-10
        assert rel(hessian.mixed_vjp_fused(model, x, y, v, weights=w, algo=algo),
                    hessian.mixed_vjp_torch_func(model, x, y, v, weights=w)) < 1e-10
    with pytest.raises(ValueError, match="one tensor per trainable parameter"):
        engine.hvp(model, x, y, [torch.randn_like(p) for p in model.parameters()])


@needs_ext
def test_shared_layer_sums_its_terms():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), shared, nn.ReLU(), shared, nn.Linear(6, 3)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    v = [torch.randn_like(p) for p in model.parameters()]
    assert len(v) == 6  # the shared layer's parameters appear once
    ref = hessian.hvp_torch_func(model, x, y, v)
    res = engine.hvp(model, x, y, v, backend="fused")
    assert rel(res.grad, ref.grad) < 1e-10 and rel(res.hv, ref.hv) < 1e-10
    assert rel(engine.mixed_vjp(model, x, y, v, backend="fused"), hessian.mixed_vjp_torch_func(model, x, y, v)) < 1e-10


# -- fallback and errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, where",
    [
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3)), r"model\[2\] \(Tanh\)"),
        (lambda: nn.Sequential(nn.Conv2d(1, 2, 2, groups=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(12, 3)),
         r"model\[0\] \(Conv2d\)"),
        (lambda: nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(12, 4), nn.Dropout(0.5).train()), nn.Linear(4, 3)),
         r"model\[1\]\[1\] \(Dropout in training mode\)"),
    ],
)
def test_unsupported_layer_falls_back_with_one_warning(model, where):
    torch.manual_seed(0)
    m = model().double()
    if not any(isinstance(mod, nn.Dropout) for mod in m.modules()):
        m.eval()
    x = torch.rand(4, 1, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    v = [torch.randn_like(p) for p in m.parameters()]
    hessian._warned.clear()
    with pytest.warns(RuntimeWarning, match=where):
        res = engine.hvp(m, x, y, v)
    assert res.backend == "torch_func"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason warns only once
        engine.mixed_vjp(m, x, y, v)
        engine.hvp(m, x, y, v)
    if not any(isinstance(mod, nn.Dropout) for mod in m.modules()):
        assert rel(res.hv, hessian.hvp_double_backward(m, x, y, v).hv) < 1e-10
    if _ext.available():
        with pytest.raises(ValueError, match=where):
            engine.hvp(m, x, y, v, backend="fused")


def test_non_sequential_model_falls_back():
    model = models.resnet_cifar(8).double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 7])
    v = [torch.randn_like(p) for p in model.parameters()]
    hessian._warned.clear()
    with pytest.warns(RuntimeWarning, match="CifarResNet"):
        mixed = engine.mixed_vjp(model, x, y, v)
    assert rel(mixed, hessian.mixed_vjp_double_backward(model, x, y, v)) < 1e-9


@pytest.mark.parametrize("backend", ["auto", "fused", "torch_func", "double_backward"])
def test_batchnorm_in_training_mode_raises(backend):
    model, x, y, v, _ = make_case("odd")
    model[2].train()
    with pytest.raises(ValueError, match="training mode"):
        engine.hvp(model, x, y, v, backend=backend)


def test_bad_inputs_raise_clear_errors():
    model, x, y, v, w = make_case("lenet", batch=3)
    with pytest.raises(ValueError, match="backend must be one of"):
        engine.hvp(model, x, y, v, backend="fast")
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        engine.hvp(model, x.long(), y, v)
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        engine.hvp(model, x[:0], y[:0], v)
    with pytest.raises(ValueError, match=r"y must be an int64 tensor of shape \(3,\)"):
        engine.hvp(model, x, y[:2], v)
    with pytest.raises(ValueError, match="y must be an int64"):
        engine.hvp(model, x, y.int(), v)
    with pytest.raises(ValueError, match="class indices >= 0"):
        engine.hvp(model, x, torch.tensor([0, -1, 2]), v)
    for backend in ("fused", "torch_func", "double_backward"):
        if backend == "fused" and not _ext.available():
            continue
        with pytest.raises(ValueError, match="classes|outside"):
            engine.hvp(model, x, torch.tensor([0, 10, 2]), v, backend=backend)
    with pytest.raises(ValueError, match=r"weights must be a tensor of shape \(3,\)"):
        engine.hvp(model, x, y, v, weights=w[:2])
    with pytest.raises(ValueError, match="one tensor per trainable parameter"):
        engine.hvp(model, x, y, v[:-1])
    with pytest.raises(ValueError, match=r"parameter 1.weight must have shape \(20, 1, 5, 5\)"):
        engine.hvp(model, x, y, [v[0][:, :, :4]] + v[1:])
    with pytest.raises(ValueError, match="1-D with"):
        engine.mixed_vjp(model, x, y, hessian.flatten(v)[:-1])
    with pytest.raises(ValueError, match="float64"):
        engine.hvp(model, x.float(), y, v)
    with pytest.raises(ValueError, match="expected torch.float64"):
        engine.hvp(model, x, y, [t.float() for t in v])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        engine.hvp(lambda t: t, x, y, v)
    with pytest.raises(ValueError, match="no trainable parameters"):
        engine.hvp(nn.Sequential(nn.Flatten()), x, y, [])


@needs_ext
def test_fused_shape_errors_name_the_layer():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.rand(2, 1, 3, 5, dtype=torch.float64)  # 15 features, the layer wants 12
    v = [torch.randn_like(p) for p in model.parameters()]
    with pytest.raises(RuntimeError, match="Linear has in_features 12, input has 15"):
        engine.hvp(model, x, torch.tensor([0, 1]), v, backend="fused")


# -- the workspace, the ops -----------------------------------------------------------------------------------


@needs_ext
def test_repeated_calls_reuse_buffers_exactly():
    model, x, y, v, w = make_case("odd", dtype=torch.float32, batch=9)
    first = hessian.hvp_fused(model, x, y, v, weights=w, algo="nhwc")
    m1 = hessian.mixed_vjp_fused(model, x, y, v, weights=w, algo="gemm")
    hessian.hvp_fused(model, x[:4], y[:4], v, algo="nhwc")  # other shapes in between
    hessian.mixed_vjp_fused(model, x[:2], y[:2], v, algo="gemm")
    again = hessian.hvp_fused(model, x, y, v, weights=w, algo="nhwc")
    assert all(torch.equal(a, b) for a, b in zip(first.hv + first.grad, again.hv + again.grad))
    assert torch.equal(m1, hessian.mixed_vjp_fused(model, x, y, v, weights=w, algo="gemm"))
    assert hessian.release_workspace() > 0
    assert hessian.release_workspace() == 0
    assert all(torch.equal(a, b) for a, b in zip(first.hv, hessian.hvp_fused(model, x, y, v, weights=w, algo="nhwc").hv))


@needs_ext
def test_inputs_are_not_modified():
    model, x, y, v, w = make_case("odd")
    before = [t.clone() for t in (x, y, w, *v, *model.state_dict().values())]
    for algo in CPU_ALGOS:
        hessian.hvp_fused(model, x, y, v, weights=w, algo=algo)
        hessian.mixed_vjp_fused(model, x, y, v, weights=w, algo=algo)
    after = (x, y, w, *v, *model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in model.parameters())


@needs_ext
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_kernel_ops_match_references(device):
    z = torch.randn(2 * 7, 5, dtype=torch.float64, device=device)
    z[3, 1] = 0.0
    y = torch.randint(0, 5, (7,), device=device)
    w = torch.rand(7, dtype=torch.float64, device=device)
    for weights in (w, None):
        loss, g = torch.ops.engine.softmax_xent_rop(z, y, weights)
        ref_loss, ref_g = hessian.softmax_xent_rop_ref(z, y, weights)
        assert rel(loss, ref_loss) < 1e-12 and rel(g, ref_g) < 1e-12
    pair = torch.randn(2 * 6, 3, 4, dtype=torch.float64, device=device)
    pair[0, 0, 0] = 0.0
    out = pair.clone()
    torch.ops.engine.relu_rop_(out)
    assert torch.equal(out, hessian.relu_rop_ref(pair))
    grad = torch.randn_like(pair)
    masked = grad.clone()
    torch.ops.engine.relu_rop_backward_(out[:6], masked)
    mask = (out[:6] > 0).to(grad.dtype)
    assert torch.equal(masked, grad * torch.cat([mask, mask]))


def _op_args(arch, device="cpu", want=(True, True), algo=0):
    model, x, y, v, w = make_case(arch, batch=3, device=device)
    plan = hessian._plan(model, x)
    # detached, as engine.hessian calls it: the op is not differentiable (it returns derivatives)
    params = [p.detach() for p in plan.params]
    return (x, y, w, params, v, list(plan.buffers), list(plan.spec), want[0], want[1], algo)


@needs_ext
@pytest.mark.parametrize("arch", ["odd", "odd2"])
@pytest.mark.parametrize("algo", [1, 2, 3])
def test_opcheck_hvp_sequential(arch, algo):
    torch.library.opcheck(torch.ops.engine.hvp_sequential.default, _op_args(arch, algo=algo))


@needs_ext
@pytest.mark.parametrize("want", [(True, False), (False, True), (False, False)])
def test_opcheck_hvp_sequential_outputs(want):
    args = _op_args("odd", want=want)
    torch.library.opcheck(torch.ops.engine.hvp_sequential.default, args)
    loss, grads, hvs, mixed = torch.ops.engine.hvp_sequential(*args)
    assert loss.dim() == 0 and len(grads) == len(hvs) == (len(args[3]) if want[0] else 0)
    assert mixed.shape == (args[0].shape if want[1] else (0,))


def test_no_extension_falls_back(monkeypatch):
    model, x, y, v, w = make_case("mlp", batch=3)
    monkeypatch.setattr(hessian._ext, "available", lambda: False)
    monkeypatch.setattr(hessian._ext, "load_error", lambda: "not built (test)")
    hessian._warned.clear()
    with pytest.warns(RuntimeWarning, match=r"engine._C is unavailable \(not built \(test\)\)"):
        res = engine.hvp(model, x, y, v, weights=w)
    assert res.backend == "torch_func"
    with pytest.raises(ValueError, match="unavailable"):
        engine.hvp(model, x, y, v, backend="fused")


@needs_ext
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_opcheck_kernel_ops(device):
    z = torch.randn(8, 5, dtype=torch.float64, device=device)
    y = torch.randint(0, 5, (4,), device=device)
    torch.library.opcheck(torch.ops.engine.softmax_xent_rop.default, (z, y, torch.rand(4, dtype=torch.float64, device=device)))
    torch.library.opcheck(torch.ops.engine.softmax_xent_rop.default, (z, y, None))
    pair = torch.randn(6, 2, 3, device=device)
    torch.library.opcheck(torch.ops.engine.relu_rop_.default, (pair.clone(),))
    torch.library.opcheck(torch.ops.engine.relu_rop_backward_.default, (pair[:3].relu(), pair.clone()))


# -- CUDA (runs on a GPU machine) ------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cuda_fused_matches_torch_func(arch, monkeypatch):
    # TF32 convolutions / matmuls (cuDNN's default) would round float32 operands to 10-bit mantissas
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        model, x, y, v, w = make_case(arch, dtype=dtype, device="cuda")
        ref = hessian.hvp_torch_func(model, x, y, v, weights=w)
        res = engine.hvp(model, x, y, v, weights=w, backend="fused")
        assert rel(res.grad, ref.grad) < tol and rel(res.hv, ref.hv) < tol
        mixed = engine.mixed_vjp(model, x, y, v, weights=w, backend="fused")
        assert mixed.is_cuda and rel(mixed, hessian.mixed_vjp_torch_func(model, x, y, v, weights=w)) < tol


@needs_cuda
def test_cuda_opcheck_hvp_sequential():
    torch.library.opcheck(torch.ops.engine.hvp_sequential.default, _op_args("odd", device="cuda"))


# -- other losses of the logits, through their expansion -----------------------------------------------------


def _coupled_loss(z, t):
    """A smooth non-cross-entropy loss of one group of rows z (m, K) that couples the rows; t: a per-group weight."""
    return t * torch.logsumexp(z, -1).pow(2).sum() + (z[0] * z[-1]).sum() + torch.tanh(z).pow(3).sum()


def _macer_group(z, yi):
    from engine.losses import macer_terms

    cls, rob = macer_terms(z[None], yi[None], 0.5, 2.0, 8.0)
    return cls[0] + 1.5 * rob[0]


def _true_derivatives(model, x, group_loss, args, group, v):
    """grad, H v and mixed term of L(w, x) = sum_g group_loss(model(x)_g, *args_g) by torch.func on the whole loss."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    primals = tuple(p.detach() for p in model.parameters() if p.requires_grad)

    def L(ps, xx):
        z = torch.func.functional_call(model, dict(zip(names, ps)), (xx,))
        return torch.func.vmap(group_loss)(z.reshape(-1, group, z.shape[-1]), *args).sum()

    (g, val), (hv, _) = torch.func.jvp(lambda *ps: torch.func.grad_and_value(lambda q: L(q, x))(ps), primals, tuple(v))
    _, mixed = torch.func.jvp(lambda *ps: torch.func.grad(lambda xx: L(ps, xx))(x), primals, tuple(v))
    return val, g, hv, mixed


@pytest.mark.parametrize("arch,group,loss", [("odd", 3, "coupled"), ("odd2", 2, "macer"), ("lenet", 3, "macer"),
                                             ("mlp", 1, "coupled")])  # fmt: skip
def test_logit_expansion_equals_true_loss_float64(arch, group, loss):
    """Every backend with a loss given by its expansion at the logits returns the gradient, H v and mixed term
    of the true loss (torch.func on the whole composite), group sizes 1-3, odd shapes."""
    torch.manual_seed(11)
    model, x, _, v, _ = make_case(arch, batch=6)
    classes = ARCHS[arch][2]
    n = 6 // group
    fn = _coupled_loss if loss == "coupled" else _macer_group
    args = (torch.rand(n, dtype=x.dtype) + 0.5,) if loss == "coupled" else (torch.randint(0, classes, (n,)),)
    with torch.no_grad():
        z = model(x)
    expansion = hessian.expand_logit_loss(fn, z, *args, group=group)
    assert expansion.group == group and expansion.hess.shape == (n, group * classes, group * classes)
    torch.testing.assert_close(expansion.hess, expansion.hess.transpose(1, 2), rtol=1e-10, atol=1e-12)
    val, g, hv, mixed = _true_derivatives(model, x, fn, args, group, v)
    assert float(hessian.flatten(hv).norm()) > 0 and float(mixed.norm()) > 0
    backends = ["torch_func", "double_backward"] + (["fused"] if _ext.available() else [])
    for backend in backends:
        res = hessian.hvp(model, x, None, v, backend=backend, expansion=expansion)
        assert rel(res.loss, val) < 1e-12, backend
        assert rel(res.grad, g) < 1e-10 and rel(res.hv, hv) < 1e-10, backend
        for h, r in zip(res.hv, hv):
            assert rel(h, r) < 1e-9, backend
        assert rel(hessian.mixed_vjp(model, x, None, v, backend=backend, expansion=expansion), mixed) < 1e-10, backend
    if _ext.available():
        for algo in CPU_ALGOS:
            res = hessian.hvp_fused(model, x, None, v, algo=algo, expansion=expansion)
            assert rel(res.hv, hv) < 1e-10, algo
            assert rel(hessian.mixed_vjp_fused(model, x, None, v, algo=algo, expansion=expansion), mixed) < 1e-10, algo


def test_logit_expansion_bad_inputs():
    model, x, y, v, w = make_case("odd", batch=4)
    with torch.no_grad():
        z = model(x)
    exp = hessian.expand_logit_loss(_coupled_loss, z, torch.ones(2, dtype=x.dtype), group=2)
    with pytest.raises(ValueError, match="weights do not apply"):
        hessian.hvp(model, x, y, v, weights=w, expansion=exp)
    with pytest.raises(ValueError, match="expansion is for 4 rows"):
        hessian.hvp(model, x[:2], None, v, expansion=exp)
    with pytest.raises(TypeError, match="LogitExpansion"):
        hessian.mixed_vjp(model, x, None, v, expansion=(z, 0))
    with pytest.raises(ValueError, match="expansion.hess is torch.float32"):
        hessian.hvp(model, x, None, v, expansion=hessian.LogitExpansion(exp.logits, exp.value, exp.grad, exp.hess.float()))
    with pytest.raises(ValueError, match="group must be a positive integer dividing B = 4"):
        hessian.expand_logit_loss(_coupled_loss, z, torch.ones(2), group=3)
    with pytest.raises(ValueError, match=r"args\[0\] must be a tensor with 2 rows"):
        hessian.expand_logit_loss(_coupled_loss, z, torch.ones(3), group=2)


@needs_ext
def test_hvp_sequential_logit_expansion_op_checks():
    """The op's own checks on logit_grad / logit_hess, and opcheck with them."""
    args = _op_args("odd")  # B = 3, 3 classes
    g = torch.randn(3, 3, dtype=torch.float64)
    h = torch.randn(3, 3, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.engine.hvp_sequential.default, args + (g, h))
    with pytest.raises(RuntimeError, match="logit_grad and logit_hess go together"):
        torch.ops.engine.hvp_sequential(*args, g, None)
    with pytest.raises(RuntimeError, match="logit_hess must be"):
        torch.ops.engine.hvp_sequential(*args, g, torch.randn(2, 3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="logit_grad must be"):
        torch.ops.engine.hvp_sequential(*args, g[:2], h)


@needs_cuda
def test_logit_expansion_fused_cuda_float64():
    """The expansion path of the CUDA sweep against the whole-loss torch.func reference on the GPU."""
    torch.manual_seed(12)
    model, x, _, v, _ = make_case("odd2", batch=6, device="cuda")
    yi = torch.randint(0, 4, (3,), device="cuda")
    with torch.no_grad():
        z = model(x)
    expansion = hessian.expand_logit_loss(_macer_group, z, yi, group=2)
    val, g, hv, mixed = _true_derivatives(model, x, _macer_group, (yi,), 2, v)
    res = hessian.hvp_fused(model, x, None, v, expansion=expansion)
    assert rel(res.grad, g) < 1e-10 and rel(res.hv, hv) < 1e-10
    assert rel(hessian.mixed_vjp_fused(model, x, None, v, expansion=expansion), mixed) < 1e-10
