"""SmoothAdv's attack: a written-out float64 reference, the soft loss it raises, constraints, mode, errors."""

import math

import pytest
import torch
from torch import nn

from engine import attacks, data


class _ModeProbe(nn.Module):
    """Records whether the model was in training mode at each forward."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return x


def _model(dtype=torch.float32, classes=10, side=8, probe=False):
    torch.manual_seed(3)
    layers = [nn.Flatten(), nn.Linear(side * side, 32), nn.Tanh(), nn.Linear(32, classes)]
    if probe:
        layers.insert(0, _ModeProbe())
    return nn.Sequential(*layers).to(dtype)


def _soft_loss_ref(model, x_i, y_i, noise_i, sigma):
    """-log(mean_j softmax(model(x_i + sigma e_j))_y) for one input, written out (float64)."""
    with torch.no_grad():
        logits = model(x_i.unsqueeze(0) + sigma * noise_i)
    probs = []
    for row in logits.tolist():
        top = max(row)
        e = [math.exp(v - top) for v in row]
        probs.append(e[y_i] / sum(e))
    return -math.log(max(sum(probs) / len(probs), 1e-20))


def _attack_ref(model, x, y, noise, sigma, eps, steps):
    """Per-input PGD written out: normalised gradient step 2 eps / T, clamp to [0, 1], project to the ball."""
    out = []
    for i in range(x.shape[0]):
        delta = torch.zeros_like(x[i])
        for _ in range(steps):
            d = delta.clone().requires_grad_(True)
            logits = model(x[i].unsqueeze(0) + d + sigma * noise[i])
            p = torch.softmax(logits, 1)[:, y[i]].mean()
            (g,) = torch.autograd.grad(-torch.log(p.clamp_min(1e-20)), [d])
            delta = delta + (2 * eps / steps) * g / g.norm()
            delta = (x[i] + delta).clamp(0, 1) - x[i]
            nrm = float(delta.norm())
            if nrm > eps:
                delta = delta * (eps / (nrm + 1e-7))  # torch.renorm's projection
        out.append(x[i] + delta)
    return torch.stack(out)


@pytest.mark.parametrize("b,m,steps", [(5, 1, 10), (3, 4, 3), (1, 2, 1)])
def test_smoothadv_matches_reference(b, m, steps):
    model = _model(torch.float64)
    x = torch.rand(b, 1, 8, 8, dtype=torch.float64)
    x[:, :, :3] = 0.0  # MNIST-like: pixels at the boundary of the range
    x[:, :, -2:] = 1.0
    y = torch.randint(0, 10, (b,))
    noise = torch.randn((b, m, 1, 8, 8), dtype=torch.float64)
    got = attacks.smoothadv(model, x, y, sigma=0.25, eps=0.8, steps=steps, m=m, noise=noise)
    ref = _attack_ref(model, x, y, noise, 0.25, 0.8, steps)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)
    # the same draws come from a generator when no noise is given
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    drawn = torch.randn((b, m, 1, 8, 8), generator=g2, dtype=torch.float64)
    got_g = attacks.smoothadv(model, x, y, sigma=0.25, eps=0.8, steps=steps, m=m, generator=g1)
    torch.testing.assert_close(got_g, _attack_ref(model, x, y, drawn, 0.25, 0.8, steps), rtol=0, atol=1e-9)


@pytest.mark.parametrize("eps", [0.25, 1.0, 3.0])
def test_smoothadv_raises_smoothed_soft_loss_and_respects_constraints(eps):
    model = _model()
    images, labels = data.load_mnist(data.embedded_mnist_root(), "test")
    x = data.to_float(images[:32, :, 10:18, 10:18]).contiguous()  # real pixels, many exactly 0 or 1
    y = labels[:32] % 10
    sigma, m = 0.25, 4
    noise = torch.randn((32, m, 1, 8, 8))
    x_adv = attacks.smoothadv(model, x, y, sigma=sigma, eps=eps, steps=10, m=m, noise=noise)
    delta = (x_adv - x).flatten(1)
    assert bool((delta.norm(dim=1) <= eps * (1 + 1e-5)).all())
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(delta.norm(dim=1).max()) > 0.5 * eps  # the attack moves
    x64, a64, n64 = x.double(), x_adv.double(), noise.double()
    model64 = _model(torch.float64)
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    # against the draws it used: higher for every input
    before = [_soft_loss_ref(model64, x64[i], int(y[i]), n64[i], sigma) for i in range(32)]
    after = [_soft_loss_ref(model64, a64[i], int(y[i]), n64[i], sigma) for i in range(32)]
    assert all(a > b for a, b in zip(after, before))
    # against fresh draws (the smoothed soft loss itself, 256 draws): higher on average, and for most inputs
    fresh = torch.randn((32, 256, 1, 8, 8), dtype=torch.float64)
    before = [_soft_loss_ref(model64, x64[i], int(y[i]), fresh[i], sigma) for i in range(32)]
    after = [_soft_loss_ref(model64, a64[i], int(y[i]), fresh[i], sigma) for i in range(32)]
    assert sum(after) > sum(before) + 0.05 * 32
    assert sum(a > b for a, b in zip(after, before)) >= 28


@pytest.mark.parametrize("start_training", [True, False])
def test_smoothadv_eval_mode_and_restores_mode(start_training):
    model = _model(probe=True)
    model.train(start_training)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    attacks.smoothadv(model, x, y, sigma=0.5, eps=0.5, steps=3, m=2)
    probe = model[0]
    assert probe.modes == [False, False, False]
    assert model.training == start_training and probe.training == start_training
    assert all(p.grad is None for p in model.parameters())  # parameter gradients untouched


def test_smoothadv_eps_zero_and_zero_gradient():
    model = _model()
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    assert torch.equal(attacks.smoothadv(model, x, y, sigma=0.5, eps=0.0), x)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    nn.init.zeros_(flat[1].weight)  # zero input gradient: a random direction is taken instead
    x_adv = attacks.smoothadv(flat, x, y, sigma=0.5, eps=0.3, steps=2, generator=torch.Generator().manual_seed(0))
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert bool(torch.isfinite(x_adv).all()) and bool((norms > 0).all()) and bool((norms <= 0.3 * (1 + 1e-5)).all())


def test_smoothadv_confident_model_is_finite():
    model = _model()
    with torch.no_grad():
        model[-1].weight.mul_(1e4)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        pred = model(x).argmax(1)
    for y in (pred, (pred + 1) % 10):
        x_adv = attacks.smoothadv(model, x, y, sigma=0.1, eps=0.5, steps=3, m=2)
        assert bool(torch.isfinite(x_adv).all())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"eps": -0.1}, "eps"),
        ({"sigma": -0.1}, "sigma"),
        ({"steps": 0}, "steps"),
        ({"m": 0}, "m must"),
        ({"noise": torch.zeros(2, 3, 1, 8, 8)}, "noise"),
    ],
)
def test_smoothadv_bad_arguments(kwargs, match):
    model = _model()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=match):
        attacks.smoothadv(model, x, y, **{"sigma": 0.25, "eps": 0.5, **kwargs})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attacks.smoothadv(model, x + 1.5, y, sigma=0.25, eps=0.5)
