"""certify / certify_dataset / predict with noise="discrete" (sound noise on the 8-bit grid, engine.noise)."""

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import engine
from engine import noise
from engine.validate import InputError


class GridThreshold(nn.Module):
    """Class 1 iff the first pixel's grid index is >= 128 (the noisy input float32(j / 255) is compared with
    127.5 / 255, which float32 rounding cannot reorder). Under the symmetric discrete noise the smoothed classifier
    is the same rule, so the exact certified radius over grid perturbations is the distance from j to the other
    side: (j - 127) / 255 or (128 - j) / 255."""

    def forward(self, x):
        s = x.flatten(1)[:, 0] - 127.5 / 255
        return torch.stack([torch.zeros_like(s), s], dim=1)


def _grid_trials(trials, spread, seed=5):
    rng = np.random.default_rng(seed)
    j = torch.from_numpy(rng.integers(128 - spread, 128 + spread, trials))
    x = torch.full((trials, 1, 2, 2), 0.3)
    x[:, 0, 0, 0] = j.float()
    x = torch.round(x * torch.where(torch.arange(4).view(1, 1, 2, 2) == 0, 1.0, 255.0)) / 255  # all on the grid
    true_class = (j >= 128).long()
    true_radius = torch.where(j >= 128, j - 127, 128 - j).double() / 255
    return x, true_class, true_radius


@pytest.mark.parametrize("sampling", ["fixed", "adaptive"])
def test_soundness_on_the_grid(sampling):
    """Certificates exceed the exact grid radius no more often than alpha allows (3,000 trials, alpha 0.1); the same
    threshold flags the unsound point-estimate radius."""
    trials, alpha, sigma = 3000, 0.1, 0.02  # sigma * 255 = 5.1 grid steps
    x, true_class, true_radius = _grid_trials(trials, 12)
    kw = {"sampling": "adaptive", "radii": [0, 0.01, 0.02, 0.03, 0.04]} if sampling == "adaptive" else {}
    res = engine.certify(GridThreshold(), x, sigma=sigma, n0=64, n=300, alpha=alpha, seed=7, noise="discrete",
                         backend="torch", **kw)
    certified = res.prediction >= 0
    violation = certified & ((res.prediction != true_class) | (res.radius > true_radius))
    limit = stats.binom.ppf(1 - 1e-9, trials, alpha)
    assert int(certified.sum()) > trials // 2
    assert int(violation.sum()) <= limit
    n_a = res.counts_estimation.gather(1, res.counts_selection.argmax(1, keepdim=True))[:, 0].double()
    p_hat = (n_a / (res.samples - 64).double()).clamp(max=1 - 1e-9)
    naive = sigma * torch.from_numpy(stats.norm.ppf(p_hat.numpy()))
    assert int(((p_hat > 0.5) & (naive > true_radius)).sum()) > limit


def test_radius_is_the_sound_one_and_backends_agree():
    x, _, _ = _grid_trials(16, 30, seed=1)
    ref = engine.certify(GridThreshold(), x, sigma=0.05, n0=50, n=400, alpha=0.01, seed=3, noise="discrete",
                         backend="torch")
    p = ref.p_lower.numpy()
    expected = np.where(p >= 0.5, noise.discrete_certified_radius(np.maximum(p, 0.5), 0.05, 4), 0.0)
    np.testing.assert_array_equal(ref.radius.numpy(), expected)
    gauss = engine.certify(GridThreshold(), x, sigma=0.05, n0=50, n=400, alpha=0.01, seed=3, backend="torch")
    assert not torch.equal(gauss.counts_estimation, ref.counts_estimation)  # another noise, other counts
    cpp = engine.certify(GridThreshold(), x, sigma=0.05, n0=50, n=400, alpha=0.01, seed=3, noise="discrete",
                         backend="cpp", batch_size=77)
    assert torch.equal(cpp.counts_selection, ref.counts_selection) and torch.equal(cpp.counts_estimation,
                                                                                 ref.counts_estimation)
    tri = engine.certify(GridThreshold(), x[:3], sigma=0.05, n0=8, n=24, alpha=0.01, seed=3, noise="discrete",
                         backend="triton")
    small = engine.certify(GridThreshold(), x[:3], sigma=0.05, n0=8, n=24, alpha=0.01, seed=3, noise="discrete",
                           backend="torch")
    assert torch.equal(tri.counts_estimation, small.counts_estimation)


def test_images_off_the_grid_and_bad_noise_are_refused(tmp_path):
    x = torch.full((2, 1, 2, 2), 0.5)  # 127.5 / 255: half-way between grid points
    with pytest.raises(InputError, match="8-bit grid"):
        engine.certify(GridThreshold(), x, sigma=0.1, n=10, noise="discrete")
    with pytest.raises(InputError, match="8-bit grid"):
        engine.predict(GridThreshold(), x, sigma=0.1, n=10, noise="discrete")
    with pytest.raises(InputError, match="noise must be one of"):
        engine.certify(GridThreshold(), x, sigma=0.1, n=10, noise="laplace")
    with pytest.raises(InputError, match="noise must be one of"):
        engine.certify_dataset(GridThreshold(), (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2)),
                               sigma=0.1, n=10, noise="uniform", out=tmp_path / "r.tsv")
    assert not (tmp_path / "r.tsv").exists()


def test_dataset_log_records_the_noise_and_predict_runs(tmp_path):
    images = torch.randint(0, 256, (6, 1, 2, 2), dtype=torch.uint8)
    labels = (images[:, 0, 0, 0] >= 128).long()
    res = engine.certify_dataset(GridThreshold(), (images, labels), sigma=0.05, n0=20, n=200, noise="discrete",
                                 out=tmp_path / "r.tsv", progress=False)
    assert res.summary["settings"]["noise"] == "discrete" and len(res) == 6
    with pytest.raises(engine.results.ResultsError, match="other settings"):
        engine.certify_dataset(GridThreshold(), (images, labels), sigma=0.05, n0=20, n=200, out=tmp_path / "r.tsv",
                               progress=False)
    pred = engine.predict(GridThreshold(), images.float() / 255, sigma=0.01, n=200, noise="discrete")
    far = (images[:, 0, 0, 0].long() - 127.5).abs() > 10
    assert torch.equal(pred[far], labels[far])
