"""End-to-end check of a PACD step's hypergradient against a finite difference of the retrained lower level.

For each training procedure, on a small problem whose L2-regularised lower level has a smooth, strongly
convex minimum, the hypergradient that :func:`engine.poison` follows (the upper objective's weight
gradient, an inverse-Hessian solve on the products of :class:`engine.pacd._Lower`, minus the mixed term)
must equal the central difference of F(w*(u)) where w*(u) minimises G(w, u) + (s / 2) ||w||^2 to machine
precision (Newton). The damping s of the solve is exactly that regulariser's Hessian.

MACER: its robustness term is non-smooth in w (hinge at gamma, top-2 switch, the correct-class mask,
the clamp of p), and exact minimisers of a regularised MACER loss tend to sit on those kinks, where w*(u)
has no derivative. The problem here keeps the minimum off them (two classes, so no top-2 switch; small
beta, so no clamp; gamma above every gap; classes well apart, so every input is classified correctly),
with the robustness term active on every input.
"""

import math

import pytest
import torch
from torch import nn

from engine import bilevel
from engine.losses import macer_inputs, macer_terms
from engine.pacd import _Functional, _generator, _Lower, _method_args, _Step, soft_radius_objective

KEY, DAMPING, SIGMA, TARGET = 3, 0.1, 0.25, 1


def _problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    means = torch.rand((2, 1, 4, 4), generator=g, dtype=torch.float64)

    def images(c, n):
        return (means[c] + 0.1 * torch.randn((n, 1, 4, 4), generator=g, dtype=torch.float64)).clamp(0, 1)

    step = _Step(xc=torch.cat([images(0, 8), images(1, 4)]), yc=torch.tensor([0] * 8 + [1] * 4), pos=torch.arange(5),
                 yp=torch.full((5,), TARGET), xv=images(TARGET, 6), seed=seed)  # fmt: skip
    return step, images(TARGET, 5), torch.randn((20, 6, 1, 4, 4), generator=g, dtype=torch.float64)


class _Problem:
    def __init__(self, method: str, margs: dict, seed: int = 0):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).double().eval()
        self.step, self.u, self.noise = _problem(seed)
        self.lower = _Lower(method, self.model, self.step, SIGMA, margs)
        self.lower.prepare(self.u)  # SmoothAdv: the attack points, held fixed (as the step does)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.like = [p.detach() for p in self.model.parameters()]

    def _params(self, w):
        return dict(zip(self.names, bilevel.unflatten(w, self.like)))

    def lower_reg(self, w, u):
        return self.lower.loss(_Functional(self.model, self._params(w)), u, KEY) + 0.5 * DAMPING * (w * w).sum()

    def upper(self, w):
        return soft_radius_objective(_Functional(self.model, self._params(w)), self.step.xv, TARGET, sigma=SIGMA,
                                     k=self.noise.shape[0], noise=self.noise)  # fmt: skip

    def argmin(self, u, w=None):
        """w*(u) by Adam (from scratch) then Newton with backtracking, until the gradient norm reaches float64
        round-off: below 1e-12, or below 1e-8 and no longer halved by a Newton step (near the minimum Newton squares
        the error, so only round-off, about 1e-12 here and dependent on the thread count, stops it shrinking)."""
        if w is None:
            w = torch.zeros(sum(t.numel() for t in self.like), dtype=torch.float64, requires_grad=True)
            opt = torch.optim.Adam([w], lr=0.05)
            for _ in range(300):
                opt.zero_grad()
                self.lower_reg(w, u).backward()
                opt.step()
            w = w.detach()
        previous = math.inf
        for _ in range(50):
            g = torch.func.grad(lambda ww: self.lower_reg(ww, u))(w)
            norm = float(g.norm())
            if norm < 1e-12 or (norm < 1e-8 and norm > previous / 2):
                return w
            previous = norm
            h = torch.autograd.functional.hessian(lambda ww: self.lower_reg(ww, u), w)
            dw, t, f0 = torch.linalg.solve(h, g), 1.0, float(self.lower_reg(w, u))
            while float(self.lower_reg(w - t * dw, u)) > f0 - 1e-4 * t * float(g @ dw) and t > 1e-6:
                t /= 2
            w = w - t * dw
        raise AssertionError(f"Newton did not converge: gradient norm {float(g.norm()):.3e}")

    def hypergradient(self, w):
        """What a PACD step computes: -mixed(p), (H + s I) p = dF/dw, with the step's own products."""
        g_w = torch.func.grad(lambda ww: self.upper(ww)[0])(w)
        with torch.no_grad():
            for p, t in zip(self.model.parameters(), bilevel.unflatten(w, self.like)):
                p.copy_(t)
        hvp, mixed = self.lower.products(self.u, KEY)
        p = bilevel.solve_cg(hvp, g_w, torch.zeros_like(g_w), steps=200, damping=DAMPING, tol=1e-14)
        assert float((hvp(p) + DAMPING * p - g_w).norm()) <= 1e-10 * float(g_w.norm())
        return -mixed(p)


@pytest.mark.parametrize(
    "method,margs",
    [
        ("gaussian", {}),
        ("smoothadv", {"eps": 0.3, "steps": 2, "m": 1}),
        ("macer", {"k": 3, "lbd": 0.5, "beta": 2.0, "gamma": 20.0}),  # both terms, robustness active everywhere
        ("macer", {"k": 2, "lbd": 0.0, "beta": 16.0, "gamma": 8.0}),  # the classification term at the crafting k
    ],
)
def test_hypergradient_matches_finite_difference_of_the_retrained_lower_level(method, margs):
    prob = _Problem(method, _method_args(method, margs))
    w = prob.argmin(prob.u)
    f, counted = prob.upper(w)
    assert counted == 1.0 and float(f) > 0  # every validation image counts, so F depends on w everywhere
    h_min = torch.linalg.eigvalsh(torch.autograd.functional.hessian(lambda ww: prob.lower_reg(ww, prob.u), w))[0]
    assert float(h_min) > 0.5 * DAMPING  # a strict local minimum: w*(u) is differentiable
    if method == "macer" and margs["lbd"] > 0:
        x = torch.cat([prob.step.xc, prob.u])
        z = _Functional(prob.model, prob._params(w))(macer_inputs(x, SIGMA, margs["k"], _generator(x.device, 0, KEY)))
        cls, rob = macer_terms(z.reshape(x.shape[0], margs["k"], 2), prob.lower.y, SIGMA, margs["beta"], margs["gamma"])
        assert bool((rob > 0).all()) and float(cls.sum()) > 0  # the robustness term is part of what is checked
    hyper = prob.hypergradient(w)
    assert hyper.shape == prob.u.shape
    g = torch.Generator().manual_seed(1)
    for d in [hyper / hyper.norm()] + [torch.randn(prob.u.shape, generator=g, dtype=torch.float64) for _ in range(2)]:
        h = 1e-5
        fd = (float(prob.upper(prob.argmin(prob.u + h * d, w))[0]) - float(prob.upper(prob.argmin(prob.u - h * d, w))[0]))
        fd /= 2 * h
        implicit = float((hyper * d).sum())
        assert abs(implicit - fd) <= 1e-5 * abs(fd) + 1e-7 * float(hyper.norm() * d.norm()), (implicit, fd)
