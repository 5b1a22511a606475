"""Hypergradient solvers against the exact implicit gradient of a strongly convex lower problem."""

import pytest
import torch
import torch.nn.functional as F

from engine import bilevel

D, NC, NP, NV, LAM = 5, 40, 7, 30, 0.5


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    xc = torch.randn(NC, D, generator=g, dtype=torch.float64)
    yc = (torch.rand(NC, generator=g) < 0.5).double()
    u = torch.randn(NP, D, generator=g, dtype=torch.float64)
    yp = (torch.rand(NP, generator=g) < 0.5).double()
    xv = torch.randn(NV, D, generator=g, dtype=torch.float64)
    yv = (torch.rand(NV, generator=g) < 0.5).double()
    return xc, yc, u, yp, xv, yv


def _lower_loss(params, u, xc, yc, yp):
    """L2-regularised logistic regression on clean data plus the poison u (mean over all points)."""
    x = torch.cat([xc, u])
    y = torch.cat([yc, yp])
    z = x @ params["w"] + params["b"]
    return F.binary_cross_entropy_with_logits(z, y) + 0.5 * LAM * (params["w"].square().sum() + params["b"].square())


def _upper(params, xv, yv):
    return F.binary_cross_entropy_with_logits(xv @ params["w"] + params["b"], yv)


def _argmin(u, xc, yc, yp):
    """Exact lower solution by Newton's method with the closed-form gradient and Hessian (float64)."""
    x = torch.cat([torch.cat([xc, u]), torch.ones(NC + NP, 1, dtype=torch.float64)], dim=1)
    y = torch.cat([yc, yp])
    theta = torch.zeros(D + 1, dtype=torch.float64)
    for _ in range(100):
        s = torch.sigmoid(x @ theta)
        grad = x.T @ (s - y) / x.shape[0] + LAM * theta
        hess = (x.T * (s * (1 - s))) @ x / x.shape[0] + LAM * torch.eye(D + 1, dtype=torch.float64)
        theta = theta - torch.linalg.solve(hess, grad)
        if float(grad.abs().max()) < 1e-15:
            break
    return {"w": theta[:D].clone(), "b": theta[D].clone()}


def _exact_hypergradient(u, xc, yc, yp, xv, yv):
    """dF(w*(u))/du by the implicit function theorem with a direct linear solve."""
    params = _argmin(u, xc, yc, yp)
    theta = torch.cat([params["w"], params["b"].reshape(1)])

    def loss(t, uu):
        return _lower_loss({"w": t[:D], "b": t[D]}, uu, xc, yc, yp)

    hess = torch.autograd.functional.hessian(lambda t: loss(t, u), theta)
    upper_grad = torch.autograd.functional.jacobian(lambda t: _upper({"w": t[:D], "b": t[D]}, xv, yv), theta)
    cross = torch.autograd.functional.jacobian(
        lambda uu: torch.autograd.functional.jacobian(lambda t: loss(t, uu), theta, create_graph=True), u
    )  # (D + 1, NP, D)
    p = torch.linalg.solve(hess, upper_grad)
    return -torch.einsum("k,kij->ij", p, cross), params


def _finite_difference_hypergradient(u, xc, yc, yp, xv, yv, h=1e-5):
    out = torch.zeros_like(u)
    for i in range(u.shape[0]):
        for j in range(u.shape[1]):
            up, um = u.clone(), u.clone()
            up[i, j] += h
            um[i, j] -= h
            out[i, j] = (_upper(_argmin(up, xc, yc, yp), xv, yv) - _upper(_argmin(um, xc, yc, yp), xv, yv)) / (2 * h)
    return out


def test_exact_hypergradient_matches_finite_differences():
    xc, yc, u, yp, xv, yv = _problem(1)
    exact, _ = _exact_hypergradient(u, xc, yc, yp, xv, yv)
    fd = _finite_difference_hypergradient(u, xc, yc, yp, xv, yv)
    torch.testing.assert_close(exact, fd, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "solver,kwargs,rtol",
    [
        ("cg", dict(steps=40), 1e-9),
        ("neumann", dict(steps=300, lr=1.0), 1e-9),
        ("approxgrad", dict(steps=800, lr=1e-2), 1e-8),
    ],
)
def test_solvers_match_exact_implicit_gradient(solver, kwargs, rtol):
    xc, yc, u, yp, xv, yv = _problem(2)
    exact, params = _exact_hypergradient(u, xc, yc, yp, xv, yv)
    lower = bilevel.FuncLower(lambda prm, uu: _lower_loss(prm, uu, xc, yc, yp), params, u)
    g = torch.func.grad(lambda prm: _upper(prm, xv, yv))(params)
    g = torch.cat([g["w"].reshape(-1), g["b"].reshape(-1)])
    p = bilevel.SOLVERS[solver](lower.hvp, g, torch.zeros_like(g), damping=0.0, **kwargs)
    hyper = -lower.mixed(p)
    err = float((hyper - exact).norm() / exact.norm())
    assert err < rtol, f"{solver}: relative error {err:.2e}"


def test_warm_start_and_adam_state_persist():
    xc, yc, u, yp, xv, yv = _problem(3)
    _, params = _exact_hypergradient(u, xc, yc, yp, xv, yv)
    lower = bilevel.FuncLower(lambda prm, uu: _lower_loss(prm, uu, xc, yc, yp), params, u)
    g = torch.ones(D + 1, dtype=torch.float64)
    exact = torch.linalg.solve(
        torch.stack([lower.hvp(e) for e in torch.eye(D + 1, dtype=torch.float64)]).T, g
    )
    state = bilevel.AdamState()
    p = torch.zeros_like(g)
    errs = []
    for _ in range(5):  # five "outer steps" of 100 warm-started Adam steps each
        p = bilevel.solve_approxgrad(lower.hvp, g, p, steps=100, lr=1e-2, damping=0.0, state=state)
        errs.append(float((p - exact).norm() / exact.norm()))
    assert state.t == 500
    assert errs[-1] < errs[0] and errs[-1] < 1e-2


def test_hvp_and_mixed_against_autograd():
    xc, yc, u, yp, xv, yv = _problem(4)
    params = {"w": torch.randn(D, dtype=torch.float64), "b": torch.tensor(0.3, dtype=torch.float64)}
    lower = bilevel.FuncLower(lambda prm, uu: _lower_loss(prm, uu, xc, yc, yp), params, u)
    theta = torch.cat([params["w"], params["b"].reshape(1)])
    hess = torch.autograd.functional.hessian(lambda t: _lower_loss({"w": t[:D], "b": t[D]}, u, xc, yc, yp), theta)
    v = torch.randn(D + 1, dtype=torch.float64)
    torch.testing.assert_close(lower.hvp(v), hess @ v, rtol=1e-12, atol=1e-14)
    uu = u.clone().requires_grad_(True)
    w = params["w"].clone().requires_grad_(True)
    b = params["b"].clone().requires_grad_(True)
    loss = _lower_loss({"w": w, "b": b}, uu, xc, yc, yp)
    gw, gb = torch.autograd.grad(loss, [w, b], create_graph=True)
    dot = (gw * v[:D]).sum() + gb * v[D]
    (mixed,) = torch.autograd.grad(dot, [uu])
    torch.testing.assert_close(lower.mixed(v), mixed, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="flat vector"):
        lower.hvp(torch.zeros(D + 2, dtype=torch.float64))


@pytest.mark.parametrize("solver", ["approxgrad", "cg", "neumann"])
def test_solver_trace_reports_the_relative_residual(solver):
    """``trace`` gets ||(H + sI) p - g|| / ||g|| of the iterates: falling on a benign SPD system, and for
    ApproxGrad and Neumann above 1 (worse than p = 0) when the step is too large for H's curvature."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    eig = torch.linspace(0.5, 2.0, 12, dtype=torch.float64)
    h = q @ torch.diag(eig) @ q.T
    g = torch.randn(12, dtype=torch.float64)

    def hvp(v):
        return h @ v

    lr = {"approxgrad": 0.2, "neumann": 0.5, "cg": None}[solver]
    trace: list = []
    p = bilevel.SOLVERS[solver](hvp, g, torch.zeros(12, dtype=torch.float64), steps=8, lr=lr, damping=0.0, trace=trace)
    assert trace[0] == pytest.approx(1.0) and len(trace) == (9 if solver == "cg" else 8)
    if solver == "cg":  # the last entry is the returned p's residual
        assert trace[-1] == pytest.approx(float((h @ p - g).norm() / g.norm()), rel=1e-6, abs=1e-12)
    assert trace[-1] < 0.5 * trace[0]
    if solver != "cg":
        big = q @ torch.diag(eig * 1000) @ q.T
        trace = []
        bilevel.SOLVERS[solver](lambda v: big @ v, g, torch.zeros(12, dtype=torch.float64), steps=8,
                                lr={"approxgrad": 5.0, "neumann": 0.01}[solver], damping=0.0, trace=trace)  # fmt: skip
        assert trace[-1] > 1.0
