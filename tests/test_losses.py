"""Training losses against straightforward float64 references, finite gradients, argument errors."""

import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

from engine import losses


def _tiny_model(classes=3, dtype=torch.float64, scale=1.0):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, classes)).to(dtype)
    with torch.no_grad():
        model[-1].weight.mul_(scale)
        model[-1].bias.mul_(scale)
    return model


def _ce_ref(logits_row, label):
    """-log softmax(logits)_label for one row, written out."""
    z = [float(v) for v in logits_row]
    top = max(z)
    return -(z[label] - top - math.log(sum(math.exp(v - top) for v in z)))


@pytest.mark.parametrize("shape", [(5, 1, 5, 5), (1, 1, 5, 5), (7, 1, 5, 5)])
def test_gaussian_augmentation_matches_reference(shape):
    model = _tiny_model()
    x = torch.rand(shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    sigma = 0.37
    loss = losses.gaussian_augmentation(model, x, y, sigma=sigma, generator=torch.Generator().manual_seed(3))
    per = losses.gaussian_augmentation(model, x, y, sigma=sigma, generator=torch.Generator().manual_seed(3), reduction="none")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = []
    with torch.no_grad():
        for i in range(shape[0]):
            logits = model((x[i] + sigma * noise[i]).unsqueeze(0))[0]
            ref.append(_ce_ref(logits, int(y[i])))
    assert per.shape == (shape[0],)
    assert per.tolist() == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert float(loss.detach()) == pytest.approx(sum(ref) / len(ref), rel=1e-12)
    # fresh noise at every call (generator advances), sigma 0 is clean cross-entropy
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        assert float(losses.gaussian_augmentation(model, x, y, sigma=sigma, generator=g)) == float(loss)
        assert float(losses.gaussian_augmentation(model, x, y, sigma=sigma, generator=g)) != float(loss)
        clean = [_ce_ref(model(x[i : i + 1])[0], int(y[i])) for i in range(shape[0])]
        assert float(losses.gaussian_augmentation(model, x, y, sigma=0)) == pytest.approx(sum(clean) / len(clean), rel=1e-12)


def _macer_ref(model, x, y, noise, sigma, beta, gamma, lbd):
    """MACER written out per input with scipy's Phi^-1; returns (loss, per-input info)."""
    b, k = noise.shape[:2]
    total_cls, total_rob, info = 0.0, 0.0, []
    with torch.no_grad():
        for i in range(b):
            logits = model(x[i].unsqueeze(0) + sigma * noise[i])  # (k, classes)
            rows = [[float(v) for v in logits[j]] for j in range(k)]
            classes = len(rows[0])

            def softmax(row, t):
                top = max(row)
                e = [math.exp(t * (v - top)) for v in row]
                return [v / sum(e) for v in e]

            p_soft = [sum(softmax(r, 1.0)[c] for r in rows) / k for c in range(classes)]
            total_cls += -math.log(p_soft[int(y[i])] + 1e-10)
            p_beta = [sum(softmax(r, beta)[c] for r in rows) / k for c in range(classes)]
            order = sorted(range(classes), key=lambda c: -p_beta[c])
            p1 = min(max(p_beta[order[0]], losses.PROB_CLAMP), 1 - losses.PROB_CLAMP)
            p2 = min(max(p_beta[order[1]], losses.PROB_CLAMP), 1 - losses.PROB_CLAMP)
            gap = norm.ppf(p1) - norm.ppf(p2)
            active = order[0] == int(y[i]) and abs(gap) <= gamma
            if active:
                total_rob += sigma / 2 * (norm.ppf(p2) - norm.ppf(p1) + gamma)
            info.append({"correct": order[0] == int(y[i]), "gap": gap, "active": active, "top": order[0]})
    return (total_cls + lbd * total_rob) / b, info


@pytest.mark.parametrize("b,k", [(24, 5), (9, 1), (13, 16)])
def test_macer_matches_reference(b, k):
    model = _tiny_model(classes=3, scale=3.0)
    x = torch.rand(b, 1, 5, 5, dtype=torch.float64)
    sigma, beta, lbd = 0.5, 16.0, 3.0
    noise = torch.randn((b, k, 1, 5, 5), generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    # labels: the smoothed top-1 for about two thirds of the inputs (so the hinge is exercised), wrong otherwise
    _, info = _macer_ref(model, x, torch.zeros(b, dtype=torch.int64), noise, sigma, beta, 1e9, lbd)
    y = torch.tensor([r["top"] if i % 3 else (r["top"] + 1) % 3 for i, r in enumerate(info)])
    gaps = sorted(r["gap"] for i, r in enumerate(info) if i % 3)
    gamma = (gaps[len(gaps) // 2 - 1] + gaps[len(gaps) // 2]) / 2  # about half of the correct ones inside the hinge
    ref, info = _macer_ref(model, x, y, noise, sigma, beta, gamma, lbd)
    got = losses.macer(
        model, x, y, sigma=sigma, k=k, beta=beta, gamma=gamma, lbd=lbd, generator=torch.Generator().manual_seed(11)
    )
    assert got.dim() == 0 and got.dtype == torch.float64
    assert float(got.detach()) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert any(r["active"] for r in info) and any(r["correct"] and not r["active"] for r in info)
    assert any(not r["correct"] for r in info)
    # lbd = 0 leaves the classification term alone
    ref0, _ = _macer_ref(model, x, y, noise, sigma, beta, gamma, 0.0)
    got0 = losses.macer(
        model, x, y, sigma=sigma, k=k, beta=beta, gamma=gamma, lbd=0.0, generator=torch.Generator().manual_seed(11)
    )
    assert float(got0.detach()) == pytest.approx(ref0, rel=1e-10)


def test_macer_gradcheck():
    """Analytic gradients (through Phi^-1) agree with finite differences in float64."""
    model = _tiny_model(classes=3, scale=2.0)
    x = torch.rand(4, 1, 5, 5, dtype=torch.float64)
    noise = torch.randn((4, 3, 1, 5, 5), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, info = _macer_ref(model, x, torch.zeros(4, dtype=torch.int64), noise, 0.3, 2.0, 50.0, 2.0)
    y = torch.tensor([r["top"] if i % 2 else (r["top"] + 1) % 3 for i, r in enumerate(info)])
    _, info = _macer_ref(model, x, y, noise, 0.3, 2.0, 50.0, 2.0)
    assert any(r["active"] for r in info) and not all(r["active"] for r in info)  # both terms take part

    def f(inp):
        return losses.macer(
            model, inp, y, sigma=0.3, k=3, beta=2.0, gamma=50.0, lbd=2.0, generator=torch.Generator().manual_seed(5)
        )

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def _grads_finite(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return bool(torch.isfinite(loss)) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("case", ["confident", "hopeless"])
def test_finite_gradients_for_extreme_logits(case):
    model = _tiny_model(classes=4, dtype=torch.float32, scale=1e4)
    x = torch.rand(16, 1, 5, 5)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred if case == "confident" else (pred + 1) % 4  # all right with p = 1, or all wrong with p = 0
    g = torch.Generator().manual_seed(0)
    for loss in (
        losses.macer(model, x, y, sigma=0.01, k=4, generator=g),
        losses.macer(model, x, y, sigma=0.01, k=4, gamma=100.0, generator=g),  # clamped inputs inside the hinge
        losses.gaussian_augmentation(model, x, y, sigma=0.01, generator=g),
    ):
        assert _grads_finite(model, loss), case
    if case == "confident":  # p1 == 1 exactly in float32 without the clamp
        with torch.no_grad():
            p = torch.softmax(16.0 * model(x), 1)
        assert bool((p.max(1).values == 1).all())


def test_macer_hopeless_loss_is_bounded():
    model = _tiny_model(classes=4, dtype=torch.float32, scale=1e4)
    x = torch.rand(8, 1, 5, 5)
    with torch.no_grad():
        y = (model(x).argmax(1) + 1) % 4
    loss = losses.macer(model, x, y, sigma=0.01, k=2, generator=torch.Generator().manual_seed(0))
    assert float(loss.detach()) <= -math.log(1e-10) + 1e-3  # classification term capped by the 1e-10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sigma": -0.1}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"k": 0}, "k"),
        ({"k": 2.5}, "k"),
        ({"beta": 0.0}, "beta"),
        ({"gamma": -1.0}, "gamma"),
        ({"lbd": -1.0}, "lbd"),
    ],
)
def test_macer_bad_arguments(kwargs, match):
    model = _tiny_model(dtype=torch.float32)
    x, y = torch.rand(2, 1, 5, 5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=match):
        losses.macer(model, x, y, **{"sigma": 0.25, **kwargs})


def test_bad_inputs():
    model = _tiny_model(dtype=torch.float32)
    x, y = torch.rand(2, 1, 5, 5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="sigma"):
        losses.gaussian_augmentation(model, x, y, sigma=-1)
    with pytest.raises(ValueError, match="x must"):
        losses.gaussian_augmentation(model, x[0], y, sigma=0.1)
    with pytest.raises(ValueError, match="y must"):
        losses.macer(model, x, y.float(), sigma=0.1)
    with pytest.raises(ValueError, match="y must"):
        losses.macer(model, x, torch.tensor([0, 1, 2]), sigma=0.1)
    with pytest.raises(ValueError, match="reduction"):
        losses.gaussian_augmentation(model, x, y, sigma=0.1, reduction="max")
