"""engine.curvature.CurvatureOperator (one forward + gradient pass, R-passes per product) against the plain
torch.func references: float64 agreement on odd shapes, weights, other losses by their expansion, frozen and
shared parameters, the CPU column path, repeated products, bad input."""

import pytest
import torch
from test_hvp import ARCHS, _coupled_loss, _macer_group, _true_derivatives, make_case, rel
from torch import nn

from engine import hessian, models
from engine.curvature import CurvatureOperator, curvature_support


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("weighted", [True, False])
def test_matches_torch_func_float64(arch, weighted):
    torch.manual_seed(3)
    model, x, y, v, w = make_case(arch, weighted=weighted, batch=6)
    ref = hessian.hvp_torch_func(model, x, y, v, weights=w)
    ref_mixed = hessian.mixed_vjp_torch_func(model, x, y, v, weights=w)
    assert float(hessian.flatten(ref.hv).norm()) > 0 and float(ref_mixed.norm()) > 0
    op = CurvatureOperator(model, x, y, weights=w)
    assert rel(op.loss, ref.loss) < 1e-12
    assert rel(op.grad, ref.grad) < 1e-10
    hv = op.hvp(v)
    assert isinstance(hv, tuple) and len(hv) == len(ref.hv)
    for h, r, p in zip(hv, ref.hv, model.parameters()):  # per parameter: a small one could hide in the whole
        assert h.shape == p.shape and h.dtype == p.dtype
        assert rel(h, r) < 1e-9
    assert rel(op.hvp(hessian.flatten(v)), ref.hv_flat) < 1e-10  # flat in, flat out
    assert op.hvp(hessian.flatten(v)).dim() == 1
    mixed = op.mixed(v)
    assert mixed.shape == x.shape and rel(mixed, ref_mixed) < 1e-10
    both_hv, both_mixed = op.products(hessian.flatten(v))
    assert rel(both_hv, ref.hv_flat) < 1e-10 and rel(both_mixed, ref_mixed) < 1e-10


def test_repeated_products_do_not_change_the_operator():
    """Products with other vectors in between leave the cached state as it was: the same v gives the same bits."""
    torch.manual_seed(4)
    model, x, y, v, w = make_case("odd", batch=5)
    op = CurvatureOperator(model, x, y, weights=w)
    first, first_mixed = op.hvp(v), op.mixed(v)
    for _ in range(3):
        op.products([torch.randn_like(t) for t in v])
    again = op.hvp(v)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(op.mixed(v), first_mixed)
    # linear in v
    v2 = [torch.randn_like(t) for t in v]
    combo = op.hvp([2.0 * a - 3.0 * b for a, b in zip(v, v2)])
    expect = [2.0 * a - 3.0 * b for a, b in zip(first, op.hvp(v2))]
    assert rel(combo, expect) < 1e-12


@pytest.mark.parametrize("arch,group,loss", [("odd", 3, "coupled"), ("lenet", 3, "macer"), ("mlp", 1, "coupled")])
def test_logit_expansion_float64(arch, group, loss):
    """A loss given by its expansion at the logits (MACER's): the true loss's gradient, H v and mixed term."""
    torch.manual_seed(11)
    model, x, _, v, _ = make_case(arch, batch=6)
    n = 6 // group
    fn = _coupled_loss if loss == "coupled" else _macer_group
    args = (torch.rand(n, dtype=x.dtype) + 0.5,) if loss == "coupled" else (torch.randint(0, ARCHS[arch][2], (n,)),)
    with torch.no_grad():
        z = model(x)
    expansion = hessian.expand_logit_loss(fn, z, *args, group=group)
    val, g, hv, mixed = _true_derivatives(model, x, fn, args, group, v)
    op = CurvatureOperator(model, x, None, expansion=expansion)
    assert rel(op.loss, val) < 1e-12
    assert rel(op.grad, g) < 1e-10 and rel(op.hvp(v), hv) < 1e-10
    assert rel(op.mixed(v), mixed) < 1e-10


def test_frozen_and_shared_parameters():
    """Frozen parameters take no tangent and have no entry (a frozen first convolution, a frozen bias); a layer
    used twice sums its terms; the products equal torch.func's on the same model."""
    torch.manual_seed(5)
    shared = nn.Linear(6, 6)
    model = nn.Sequential(models.Normalize((0.5,), (0.25,)), nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 4, 2, bias=True), nn.Flatten(), nn.Linear(36, 6), nn.ReLU(), shared, nn.ReLU(),
                          shared, nn.Linear(6, 3)).double().eval()
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    x = torch.rand(5, 1, 11, 11, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn_like(p) for p in params]
    ref = hessian.hvp_torch_func(model, x, y, v)
    op = CurvatureOperator(model, x, y)
    hv = op.hvp(v)
    assert len(hv) == len(params)
    assert rel(hv, ref.hv) < 1e-10 and rel(op.grad, ref.grad) < 1e-10
    assert rel(op.mixed(v), hessian.mixed_vjp_torch_func(model, x, y, v)) < 1e-10
    # only the first convolution's bias trainable: its tangent starts at that layer
    for p in model.parameters():
        p.requires_grad_(False)
    model[1].bias.requires_grad_(True)
    v = [torch.randn_like(model[1].bias)]
    ref = hessian.hvp_torch_func(model, x, y, v)
    assert rel(CurvatureOperator(model, x, y).hvp(v), ref.hv) < 1e-10


def test_float32_lenet_column_path():
    """LeNet in float32 on the CPU at a batch where the first convolution takes the column (GEMM) path: equal to
    the float64 reference within float32 rounding, for the products and the mixed term."""
    torch.manual_seed(6)
    model = models.lenet_mnist().eval()
    x = torch.rand(24, 1, 28, 28) + 0.3 * torch.randn(24, 1, 28, 28)
    y = torch.randint(0, 10, (24,))
    v = [torch.randn_like(p) for p in model.parameters()]
    op = CurvatureOperator(model, x, y)
    first = op._layers[1]
    assert first.kind == "conv" and "cols" in first.aux
    m64 = models.lenet_mnist().double().eval()
    m64.load_state_dict({k: t.double() for k, t in model.state_dict().items()})
    v64 = [t.double() for t in v]
    ref = hessian.hvp_torch_func(m64, x.double(), y, v64)
    assert rel([h.double() for h in op.hvp(v)], ref.hv) < 1e-5
    assert rel(op.mixed(v).double(), hessian.mixed_vjp_torch_func(m64, x.double(), y, v64)) < 1e-5


def test_inputs_are_not_modified():
    torch.manual_seed(7)
    model, x, y, v, w = make_case("odd2")
    before = (x.clone(), [t.clone() for t in v], [p.detach().clone() for p in model.parameters()])
    op = CurvatureOperator(model, x, y, weights=w)
    op.products(v)
    assert torch.equal(x, before[0])
    assert all(torch.equal(a, b) for a, b in zip(v, before[1]))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before[2]))


def test_bad_input():
    torch.manual_seed(8)
    model, x, y, v, _ = make_case("odd")
    with pytest.raises(ValueError, match="y must be an int64"):
        CurvatureOperator(model, x, y.float())
    with pytest.raises(ValueError, match="x must be a floating"):
        CurvatureOperator(model, x.long(), y)
    unsupported = nn.Sequential(nn.Flatten(), nn.Linear(2 * 7 * 9, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    ok, reason = curvature_support(unsupported, x)
    assert not ok and "Tanh" in reason
    with pytest.raises(ValueError, match="Tanh"):
        CurvatureOperator(unsupported, x, y)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        CurvatureOperator(model, x, y)
    model.eval()
    op = CurvatureOperator(model, x, y)
    with pytest.raises(ValueError, match="1-D with"):
        op.hvp(torch.zeros(3, dtype=x.dtype))
    with pytest.raises(ValueError, match="per-parameter"):
        op.hvp(v[:-1])
    with pytest.raises(ValueError, match="v entry"):
        op.hvp([t.float() for t in v])
