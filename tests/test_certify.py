"""CERTIFY / PREDICT: soundness, reproducibility, agreement with a plain loop, argument checks."""

import math

import numpy as np
import pytest
import torch
from kernel_testing import assert_no_near_ties
from scipy import stats
from torch import nn

import engine
from engine import _ext, models, noise


class LinearTwoClass(nn.Module):
    """Logits (0, w.x - b): class 1 iff w.x > b. Its smoothed classifier has exact radius |w.x - b| / ||w||."""

    def __init__(self, w, b):
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)
        self.b = b

    def forward(self, x):
        s = x.flatten(1) @ self.w - self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


def test_soundness_linear_model():
    """Certified radius exceeds the true radius in at most an alpha-consistent fraction of trials."""
    trials, alpha, sigma = 3000, 0.1, 0.25
    # w = ones(16), b = 8: at x = 0.5 + c/4 (all pixels) the score w.x - b is 4c, so the smoothed
    # classifier's exact radius is |c| and p_A = Phi(|c| / sigma); spread p_A over (0.55, 0.999).
    rng = np.random.default_rng(3)
    c = sigma * stats.norm.ppf(rng.uniform(0.55, 0.999, trials)) * rng.choice([-1.0, 1.0], trials)
    x = torch.from_numpy(0.5 + c / 4).float()[:, None, None, None].expand(trials, 1, 4, 4).contiguous()
    model = LinearTwoClass(torch.ones(16), 8.0)
    score = x.flatten(1) @ model.w - model.b
    true_class = (score > 0).long()
    true_radius = (score.abs() / model.w.norm()).double()
    assert float((true_radius - torch.from_numpy(np.abs(c))).abs().max()) < 1e-6

    res = engine.certify(model, x, sigma=sigma, n0=64, n=200, alpha=alpha, seed=11)
    certified = res.prediction >= 0
    violation = certified & ((res.prediction != true_class) | (res.radius > true_radius))
    v = int(violation.sum())
    limit = stats.binom.ppf(1 - 1e-9, trials, alpha)  # a sound certifier exceeds this with prob < 1e-9
    assert int(certified.sum()) > trials // 2  # the test exercises real certificates
    assert v <= limit, f"{v} violations out of {trials} (alpha-consistent limit {limit})"

    # power: the same check flags the unsound point-estimate radius sigma * Phi^-1(nA / n)
    n_a = res.counts_estimation.gather(1, res.counts_selection.argmax(1, keepdim=True))[:, 0].double()
    p_hat = (n_a / 200).clamp(max=1 - 1e-9)
    naive = torch.where(p_hat > 0.5, sigma * torch.from_numpy(stats.norm.ppf(p_hat.numpy())), torch.zeros_like(p_hat))
    naive_v = int(((p_hat > 0.5) & (naive > true_radius)).sum())
    assert naive_v > limit


def _plain_loop(model, x, sigma, n0, n, alpha, seed):
    """Cohen et al.'s algorithm, one sample at a time, written independently of engine.certify."""
    preds, radii, all0, all1 = [], [], [], []
    with torch.no_grad():
        for i in range(x.shape[0]):
            counts = []
            for stream, num in ((noise.STREAM_SELECTION, n0), (noise.STREAM_ESTIMATION, n)):
                c = np.zeros(10, dtype=np.int64)
                for s in range(num):
                    noisy = noise.noisy_batch_ref(
                        x[i : i + 1],
                        torch.tensor([0]),
                        torch.tensor([s]),
                        torch.tensor([i]),
                        seed=seed,
                        stream=stream,
                        sigma=sigma,
                    )
                    c[int(model(noisy).argmax())] += 1
                counts.append(c)
            c_a = int(np.argmax(counts[0]))
            n_a = int(counts[1][c_a])
            p_low = stats.beta.ppf(alpha, n_a, n - n_a + 1) if n_a > 0 else 0.0
            if p_low < 0.5:
                preds.append(-1)
                radii.append(0.0)
            else:
                preds.append(c_a)
                radii.append(sigma * stats.norm.ppf(p_low))
            all0.append(counts[0])
            all1.append(counts[1])
    return np.array(preds), np.array(radii), np.stack(all0), np.stack(all1)


def _lenet(seed=0):
    torch.manual_seed(seed)
    model = models.lenet_mnist().eval()
    with torch.no_grad():
        model[-1].weight.mul_(20)  # spread the logits so that several classes occur under noise
    return model


def _streams(n0, n):
    return {noise.STREAM_SELECTION: n0, noise.STREAM_ESTIMATION: n}


# certify's CPU path (fused convolutions, batched linear layers) sums in another order than the plain loop, and
# MKL / oneDNN's order depends on the batch shape, the CPU and the thread count: the tests that demand equal counts
# from two such runs first check (float64, deterministic) that no noisy sample of their fixed data is a near-tie.


def test_agrees_with_plain_loop():
    model = _lenet()
    x = torch.rand(3, 1, 28, 28)
    assert_no_near_ties(model, x, torch.arange(3), _streams(20, 120), seed=5, sigma=0.5)
    res = engine.certify(model, x, sigma=0.5, n0=20, n=120, alpha=0.01, seed=5, batch_size=64)
    preds, radii, c0, c1 = _plain_loop(model, x, 0.5, 20, 120, 0.01, 5)
    np.testing.assert_array_equal(res.counts_selection.numpy(), c0)
    np.testing.assert_array_equal(res.counts_estimation.numpy(), c1)
    np.testing.assert_array_equal(res.prediction.numpy(), preds)
    np.testing.assert_allclose(res.radius.numpy(), radii, rtol=1e-12, atol=1e-12)


def test_same_seed_same_counts_for_any_batch_size_and_different_seeds_differ():
    model = _lenet(1)
    x = torch.rand(3, 1, 28, 28)
    assert_no_near_ties(model, x, torch.arange(3), _streams(100, 1000), seed=42, sigma=0.5)
    results = [engine.certify(model, x, sigma=0.5, n0=100, n=1000, seed=42, batch_size=b) for b in (1, 7, 100, 1000)]
    nonzero = (results[0].counts_estimation > 0).sum(1)
    assert int(nonzero.max()) >= 2, "model too confident for a meaningful test"
    for r in results[1:]:
        assert torch.equal(r.counts_selection, results[0].counts_selection)
        assert torch.equal(r.counts_estimation, results[0].counts_estimation)
        assert torch.equal(r.prediction, results[0].prediction) and torch.equal(r.radius, results[0].radius)
    other = engine.certify(model, x, sigma=0.5, n0=100, n=1000, seed=43, batch_size=100)
    assert not torch.equal(other.counts_estimation, results[0].counts_estimation)
    # selection and estimation use independent streams
    assert not torch.equal(results[0].counts_selection * 10, results[0].counts_estimation)


def test_results_do_not_depend_on_sharding():
    model = _lenet(2)
    x = torch.rand(4, 1, 28, 28)
    ids = torch.tensor([10, 11, 12, 13])
    assert_no_near_ties(model, x, ids, _streams(30, 300), seed=1, sigma=0.5)
    whole = engine.certify(model, x, sigma=0.5, n0=30, n=300, seed=1, image_ids=ids, batch_size=77)
    parts = [engine.certify(model, x[i : i + 2], sigma=0.5, n0=30, n=300, seed=1, image_ids=ids[i : i + 2]) for i in (0, 2)]
    assert torch.equal(whole.counts_estimation, torch.cat([p.counts_estimation for p in parts]))
    assert torch.equal(whole.radius, torch.cat([p.radius for p in parts]))


@pytest.mark.skipif(not _ext.available(), reason="engine._C not built")
def test_backends_give_identical_counts():
    model = _lenet(3)
    x = torch.rand(2, 1, 28, 28)
    a = engine.certify(model, x, sigma=0.25, n0=50, n=400, seed=9, backend="torch")
    b = engine.certify(model, x, sigma=0.25, n0=50, n=400, seed=9, backend="cpp")
    assert torch.equal(a.counts_selection, b.counts_selection) and torch.equal(a.counts_estimation, b.counts_estimation)


def test_result_types_and_mode_restored():
    model = _lenet()
    model.train()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    res = engine.certify(model, x, sigma=0.25, n0=10, n=50)
    assert model.training
    assert res.prediction.dtype == torch.int64 and res.prediction.shape == (2,)
    assert res.radius.dtype == torch.float64 and res.seconds.dtype == torch.float64
    assert res.counts_selection.shape == (2, 10) and res.counts_selection.dtype == torch.int64
    assert res.counts_selection.sum(1).tolist() == [10, 10] and res.counts_estimation.sum(1).tolist() == [50, 50]
    assert bool((res.seconds > 0).all()) and len(res) == 2
    abstained = res.prediction == -1
    assert bool((res.radius[abstained] == 0).all())


def test_abstains_on_a_coin_flip_and_certifies_a_constant():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1.0, 0.0]]).expand(x.shape[0], 3)

    class Coin(nn.Module):  # class by the sign of the noisy first pixel around 0.5
        def forward(self, x):
            s = x.flatten(1)[:, 0] - 0.5
            return torch.stack([s, -s], 1)

    x = torch.full((1, 1, 2, 2), 0.5)
    res = engine.certify(Constant(), x, sigma=0.5, n0=10, n=1000, alpha=0.001)
    assert res.prediction.tolist() == [1]
    assert float(res.radius[0]) == pytest.approx(0.5 * stats.norm.ppf(0.001 ** (1 / 1000)), rel=1e-12)
    assert engine.certify(Coin(), x, sigma=0.5, n0=10, n=1000).prediction.tolist() == [-1]
    assert engine.predict(Coin(), x, sigma=0.5, n=1000).tolist() == [-1]
    assert engine.predict(Constant(), x, sigma=0.5, n=1000).tolist() == [1]


def test_predict_matches_counts_and_binomial_test():
    model = _lenet(4)
    x = torch.rand(5, 1, 28, 28)
    assert_no_near_ties(model, x, torch.arange(5), {noise.STREAM_PREDICT: 200}, seed=3, sigma=0.5)
    out = engine.predict(model, x, sigma=0.5, n=200, alpha=0.05, seed=3, batch_size=33)
    again = engine.predict(model, x, sigma=0.5, n=200, alpha=0.05, seed=3, batch_size=1000)
    assert torch.equal(out, again)
    ids = torch.arange(5)
    with torch.no_grad():
        for i in range(5):
            rows = torch.arange(200)
            batch = noise.noisy_batch_ref(x, torch.full((200,), i), rows, ids, seed=3, stream=noise.STREAM_PREDICT, sigma=0.5)
            counts = np.bincount(model(batch).argmax(1).numpy(), minlength=10)
            order = sorted(range(10), key=lambda c: (-counts[c], c))
            c1, c2 = counts[order[0]], counts[order[1]]
            expect = order[0] if stats.binomtest(c1, c1 + c2, 0.5).pvalue <= 0.05 else -1
            assert int(out[i]) == expect


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=-1.0), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(sigma=0.25, alpha=0.0), "alpha"),
        (dict(sigma=0.25, alpha=1.0), "alpha"),
        (dict(sigma=0.25, n0=0), "n0"),
        (dict(sigma=0.25, n=0), "n"),
        (dict(sigma=0.25, batch_size=0), "batch_size"),
        (dict(sigma=0.25, seed=-3), "seed"),
        (dict(sigma=0.25, backend="cuda"), "backend"),
        (dict(sigma=0.25, image_ids=torch.tensor([1])), "image_ids"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        engine.certify(_lenet(), torch.rand(2, 1, 28, 28), **{"n0": 5, "n": 10, **kwargs})


def test_bad_inputs_raise_clear_errors():
    model = _lenet()
    with pytest.raises(ValueError, match="shape"):
        engine.certify(model, torch.rand(1, 28, 28), sigma=0.25, n0=5, n=10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        engine.certify(model, torch.rand(1, 1, 28, 28) * 2, sigma=0.25, n0=5, n=10)
    with pytest.raises(ValueError, match="NaN"):
        engine.certify(model, torch.full((1, 1, 28, 28), math.nan), sigma=0.25, n0=5, n=10)
    with pytest.raises(TypeError, match="floating"):
        engine.certify(model, torch.zeros(1, 1, 28, 28, dtype=torch.uint8), sigma=0.25, n0=5, n=10)
    with pytest.raises(ValueError, match="model output"):
        engine.certify(nn.Flatten(0), torch.rand(1, 1, 28, 28), sigma=0.25, n0=5, n=10)

    class NaNModel(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3), math.nan)

    with pytest.raises(ValueError, match="NaN"):
        engine.certify(NaNModel(), torch.rand(1, 1, 4, 4), sigma=0.25, n0=5, n=10)
    with pytest.raises(TypeError, match="nn.Module"):
        engine.certify(lambda t: t, torch.rand(1, 1, 4, 4), sigma=0.25, n0=5, n=10)


def test_empty_batch():
    res = engine.certify(_lenet(), torch.rand(0, 1, 28, 28), sigma=0.25, n0=5, n=10)
    assert len(res) == 0 and res.radius.shape == (0,)


def test_cpu_fast_forward_model_pools_before_relu_exactly():
    import copy

    from engine.smoothing import _pool_before_relu, fast_forward_model

    torch.manual_seed(0)
    nested = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        torch.nn.Sequential(torch.nn.Conv2d(4, 5, 3), torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2)),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(7),
    )
    x = torch.randn(6, 1, 13, 11)  # odd sizes: partial windows with ceil_mode and padding
    nested(x)
    for model in (_lenet(3), nested):
        model.eval()
        swapped = copy.deepcopy(model)
        _pool_before_relu(swapped)
        kinds = [type(m).__name__ for m in swapped.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.MaxPool2d))]
        assert kinds[:2] == ["MaxPool2d", "ReLU"]
        inp = x if model is nested else torch.randn(6, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(swapped(inp), model(inp))  # same layers, same memory format: bit for bit
            fast = fast_forward_model(model, torch.device("cpu"), "auto")
            torch.testing.assert_close(fast(inp), model(inp), rtol=1e-5, atol=1e-5)
        # the caller's model keeps its order
        assert [type(m).__name__ for m in model.modules()].index("ReLU") < [
            type(m).__name__ for m in model.modules()
        ].index("MaxPool2d")


def test_pool_first_view_shares_layers_and_gives_the_same_gradients():
    from engine.smoothing import pool_first_view

    torch.manual_seed(3)
    nested = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        torch.nn.Sequential(torch.nn.Conv2d(4, 5, 3), torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2)),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(1, return_indices=False),
        torch.nn.Flatten(),
        torch.nn.Linear(10, 7),
    ).double()
    view = pool_first_view(nested)
    order = [type(m).__name__ for m in view.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.MaxPool2d))]
    assert order == ["MaxPool2d", "ReLU", "MaxPool2d", "ReLU", "MaxPool2d", "ReLU"]
    assert [id(p) for p in view.parameters()] == [id(p) for p in nested.parameters()]  # the same parameter objects
    assert [type(m).__name__ for m in nested.modules()][3:5] == ["ReLU", "MaxPool2d"]  # the original keeps its order
    x = torch.randn(5, 1, 13, 11, dtype=torch.float64)  # odd sizes: ceil-mode and padded windows
    x[0] = -x[0].abs()  # an image whose first-layer windows are mostly non-positive (zero gradient in both orders)
    for mode in ("train", "eval"):
        getattr(nested, mode)()
        assert view[1].training == (mode == "train")  # mode set on the model reaches the view's layers
        grads = []
        for module in (nested, view):
            nested.zero_grad()
            out = module(x)
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            grads.append((out.detach(), [p.grad.clone() for p in nested.parameters()]))
        assert torch.equal(grads[0][0], grads[1][0])
        for a, b in zip(grads[0][1], grads[1][1]):
            assert torch.equal(a, b)
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.MaxPool2d(2), torch.nn.ReLU())
    assert pool_first_view(plain) is plain  # nothing to swap: the module itself
    indexed = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.MaxPool2d(2, return_indices=True))
    assert pool_first_view(indexed) is indexed
    lenet = _lenet(3)
    assert pool_first_view(lenet) is not lenet


def test_maxpool2x2_equals_max_pool2d_bit_for_bit():
    from engine.smoothing import MaxPool2x2, fast_forward_model

    pool = MaxPool2x2()
    g = torch.Generator().manual_seed(7)
    for shape in [(5, 20, 24, 24), (3, 50, 8, 8), (2, 1, 2, 2), (4, 3, 7, 10), (2, 6, 9, 9), (1, 33, 6, 14)]:
        x = torch.randn(shape, generator=g) * 100
        x[0, 0, 0, 0] = float("inf")  # extreme values still picked exactly
        x[-1, -1, -1, -1] = -float("inf")
        for layout in (torch.channels_last, torch.contiguous_format):
            xi = x.contiguous(memory_format=layout)
            with torch.no_grad():
                out = pool(xi)
            ref = torch.nn.functional.max_pool2d(xi, 2)
            assert out.shape == ref.shape and torch.equal(out, ref), (shape, layout)
    # autograd inputs take max_pool2d (its gradient)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    pool(x.contiguous(memory_format=torch.channels_last)).sum().backward()
    assert x.grad is not None and float(x.grad.sum()) == 2 * 3 * 4
    # certification's CPU model uses it for LeNet's 2x2 pools, and keeps other pools as they are
    fast = fast_forward_model(_lenet(3), torch.device("cpu"), "auto")
    assert sum(isinstance(m, MaxPool2x2) for m in fast.modules()) == 2
    assert not any(type(m) is torch.nn.MaxPool2d for m in fast.modules())
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.MaxPool2d(3, stride=2), torch.nn.Flatten())
    kinds = [type(m).__name__ for m in fast_forward_model(other, torch.device("cpu"), "auto").modules()]
    assert "MaxPool2d" in kinds and "MaxPool2x2" not in kinds
