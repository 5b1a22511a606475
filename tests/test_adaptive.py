"""Adaptive CERTIFY (engine.adaptive): soundness, stopping, reproducibility, logs and the command line."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats
from test_certify import LinearTwoClass
from torch import nn

import engine
from engine import adaptive
from engine.results import HEADER_SAMPLES, ResultsError, read_log
from engine.stats import clopper_pearson_lower, clopper_pearson_upper
from engine.validate import InputError

GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]


class Threshold(nn.Module):
    """Class 1 iff the first pixel exceeds t: p_A = Phi(|x0 - t| / sigma) exactly, radius |x0 - t|, and no
    reduction in the forward pass, so the counts cannot depend on how rows are batched."""

    def __init__(self, t=0.5):
        super().__init__()
        self.t = t

    def forward(self, x):
        s = x.flatten(1)[:, 0] - self.t
        return torch.stack([torch.zeros_like(s), s], dim=1)


def _linear_trials(trials=3000, sigma=0.25, hi=0.9999, seed=3):
    rng = np.random.default_rng(seed)
    c = sigma * stats.norm.ppf(rng.uniform(0.55, hi, trials)) * rng.choice([-1.0, 1.0], trials)
    x = torch.from_numpy(0.5 + c / 4).float()[:, None, None, None].expand(trials, 1, 4, 4).contiguous()
    model = LinearTwoClass(torch.ones(16), 8.0)
    score = x.flatten(1) @ model.w - model.b
    return model, x, (score > 0).long(), (score.abs() / model.w.norm()).double()


def test_look_schedule():
    looks = adaptive.look_schedule(100_000)
    assert len(looks) == 20 and looks[:3] == (139, 196, 277) and looks[-3:] == (50000, 70711, 100000)
    for n in (1, 7, 150, 199, 200, 201, 999, 12345, 10**6):
        looks = adaptive.look_schedule(n)
        assert looks[-1] == n and list(looks) == sorted(set(looks))
        assert looks[0] >= min(n, adaptive.FIRST_LOOK)
        assert all(b <= 2 * a + 1 for a, b in zip(looks, looks[1:]))


def test_clopper_pearson_upper_mirrors_the_lower_bound_and_covers():
    k, n = np.array([0, 1, 50, 99, 100]), 100
    np.testing.assert_allclose(clopper_pearson_upper(k, n, 0.01), 1 - clopper_pearson_lower(n - k, n, 0.01))
    rng = np.random.default_rng(0)
    p = 0.9
    draws = rng.binomial(200, p, 20000)
    misses = int((clopper_pearson_upper(draws, 200, 0.05) < p).sum())
    assert misses <= stats.binom.ppf(1 - 1e-9, 20000, 0.05)


@pytest.mark.parametrize("mode", ["decision", "radius"])
def test_soundness_linear_model(mode):
    """Returned certificates (grid radius in decision mode) exceed the exact radius in at most an alpha-consistent
    fraction of 3,000 trials; the same check flags an unsound certifier."""
    trials, alpha, sigma = 3000, 0.1, 0.25
    model, x, true_class, true_radius = _linear_trials(trials, sigma)
    kw = {"radii": GRID} if mode == "decision" else {"radius_tol": 0.02}
    res = engine.certify(model, x, sigma=sigma, n0=64, n=4000, alpha=alpha, seed=11, sampling="adaptive", **kw)
    certified = res.prediction >= 0
    violation = certified & ((res.prediction != true_class) | (res.radius > true_radius))
    limit = stats.binom.ppf(1 - 1e-9, trials, alpha)
    assert int(certified.sum()) > trials // 2
    assert int(violation.sum()) <= limit, f"{int(violation.sum())} violations (limit {limit})"
    assert float(res.samples.double().mean()) < 64 + 4000  # some images stopped early

    # power: the unsound point estimate at the same stopping samples is flagged by the same threshold
    c_a = res.counts_selection.argmax(1)
    n_a = res.counts_estimation.gather(1, c_a[:, None])[:, 0].double()
    p_hat = (n_a / (res.samples - 64).double()).clamp(max=1 - 1e-9)
    naive = sigma * torch.from_numpy(stats.norm.ppf(p_hat.numpy()))
    assert int(((p_hat > 0.5) & (naive > true_radius)).sum()) > limit


def test_results_follow_from_the_counts_and_the_plan():
    """p_lower is Clopper-Pearson at alpha / L from the samples drawn; the radius follows from it; samples are n0
    plus one of the looks."""
    model, x, _, _ = _linear_trials(300, 0.25)
    plan = adaptive.make_plan(4000, 0.05, GRID)
    for kw in ({"radii": GRID}, {"radius_tol": 0.05}):
        res = engine.certify(model, x, sigma=0.25, n0=32, n=4000, alpha=0.05, seed=2, sampling="adaptive", **kw)
        est = res.samples - 32
        assert set(est.tolist()) <= set(plan.looks) and len(set(est.tolist())) > 1
        assert torch.equal(res.counts_estimation.sum(1), est)
        n_a = res.counts_estimation.gather(1, res.counts_selection.argmax(1, keepdim=True))[:, 0]
        np.testing.assert_allclose(res.p_lower.numpy(), clopper_pearson_lower(n_a.numpy(), est.numpy(),
                                                                              0.05 / len(plan.looks)))
        radius = 0.25 * stats.norm.ppf(np.clip(res.p_lower.numpy(), 0.5, 1))
        certified = res.p_lower.numpy() >= 0.5
        assert np.array_equal(res.prediction.numpy() >= 0, certified)
        if "radii" in kw:
            grid = np.array(GRID)
            floor = np.array([grid[grid <= r + 1e-12].max() if r >= 0 else 0.0 for r in radius])
            assert np.all(np.isin(res.radius.numpy()[certified], grid))
            np.testing.assert_allclose(res.radius.numpy()[certified], floor[certified])
        else:
            np.testing.assert_allclose(res.radius.numpy()[certified], radius[certified], rtol=1e-12)
        assert np.all(res.radius.numpy()[~certified] == 0)


def test_decision_mode_stops_early_on_settled_images():
    """A constant classifier is certified at the largest reachable grid radius after a few hundred samples; with the
    grid starting above 0, a coin flip stops as soon as no grid radius is reachable."""

    class Constant(nn.Module):
        def forward(self, x):
            return torch.stack([torch.zeros(x.shape[0]), torch.ones(x.shape[0])], dim=1)

    x = torch.full((3, 1, 2, 2), 0.5)
    res = engine.certify(Constant(), x, sigma=0.25, n0=100, n=100_000, sampling="adaptive", radii=[0, 0.25, 0.5, 3.0])
    assert res.prediction.tolist() == [1, 1, 1] and res.radius.tolist() == [0.5, 0.5, 0.5]
    plan = adaptive.make_plan(100_000, 0.001, [0, 0.25, 0.5, 3.0])
    first = min(m for m in plan.looks if clopper_pearson_lower(m, m, plan.alpha_look) >= stats.norm.cdf(2.0))
    assert res.samples.tolist() == [100 + first] * 3 and first < 1000  # the first look certifying Phi(2)
    class Thirds(nn.Module):  # three classes of probability 1/3 each around x0 = 0.5: nothing is certifiable
        def forward(self, x):
            z = (x.flatten(1)[:, 0] - 0.5) / 0.25
            cut = float(stats.norm.ppf(2 / 3))
            return nn.functional.one_hot(torch.bucketize(z, torch.tensor([-cut, cut])), 3).float()

    thirds = engine.certify(Thirds(), x, sigma=0.25, n0=100, n=100_000, sampling="adaptive", radii=[0, 0.5])
    assert (thirds.prediction == -1).all() and (thirds.samples < 100 + 2000).all()
    fixed = engine.certify(Constant(), x, sigma=0.25, n0=100, n=1000)
    assert fixed.samples.tolist() == [1100] * 3


def test_same_results_for_any_batch_size_and_grouping():
    x = torch.rand(9, 1, 3, 3)
    kw = dict(sigma=0.3, n0=20, n=3000, alpha=0.01, seed=4, sampling="adaptive", radii=[0, 0.1, 0.3], backend="torch")
    ref = engine.certify(Threshold(0.45), x, batch_size=1000, **kw)
    for bs in (1, 7):
        other = engine.certify(Threshold(0.45), x, batch_size=bs, **kw)
        for f in ("prediction", "radius", "samples", "counts_estimation", "p_lower"):
            assert torch.equal(getattr(ref, f), getattr(other, f)), f
    alone = engine.certify(Threshold(0.45), x[4:5], image_ids=torch.tensor([4]), batch_size=64, **kw)
    assert int(alone.samples[0]) == int(ref.samples[4]) and float(alone.radius[0]) == float(ref.radius[4])
    assert torch.equal(alone.counts_estimation[0], ref.counts_estimation[4])


@pytest.mark.parametrize("kwargs, match", [
    ({"sampling": "sequential"}, "sampling must be one of"),
    ({"radii": [0, 0.5]}, "apply to sampling='adaptive' only"),
    ({"radius_tol": 0.1}, "apply to sampling='adaptive' only"),
    ({"sampling": "adaptive", "radii": []}, "radii is empty"),
    ({"sampling": "adaptive", "radii": [0, -0.5]}, "finite and >= 0"),
    ({"sampling": "adaptive", "radii": [0.5, 0.5]}, "must not repeat"),
    ({"sampling": "adaptive", "radii": "abc"}, "list of numbers"),
    ({"sampling": "adaptive", "radii": [0.5], "radius_tol": 0.1}, "not both"),
    ({"sampling": "adaptive", "radius_tol": 0}, "radius_tol must be a number > 0"),
])
def test_bad_adaptive_settings(kwargs, match):
    with pytest.raises(InputError, match=match):
        engine.certify(Threshold(), torch.rand(2, 1, 2, 2), sigma=0.25, n=100, **kwargs)


class Crashes(nn.Module):
    """Threshold that raises after ``after`` forward calls (a run killed in the middle)."""

    def __init__(self, after):
        super().__init__()
        self.inner, self.calls, self.after = Threshold(0.45), 0, after

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.inner(x)


@pytest.mark.parametrize("kw", [{"radii": [0, 0.2, 0.4]}, {"radius_tol": 0.05}], ids=["decision", "radius"])
def test_adaptive_logs_record_samples_and_resume(tmp_path, kw):
    torch.manual_seed(1)
    images = (torch.rand(12, 1, 3, 3) * 255).round().to(torch.uint8)
    labels = torch.randint(0, 2, (12,))
    common = dict(sigma=0.3, n0=20, n=2000, alpha=0.01, seed=3, sampling="adaptive", images_per_chunk=2,
                  progress=False, backend="torch", **kw)
    counter = Crashes(after=10**9)
    whole = engine.certify_dataset(counter, (images, labels), out=tmp_path / "whole.tsv", **common)
    assert (tmp_path / "whole.tsv").read_text().splitlines()[0] == HEADER_SAMPLES
    summary, rows = read_log(tmp_path / "whole.tsv")
    assert summary["settings"]["sampling"] == "adaptive" and summary["settings"]["looks"][-1] == 2000
    assert summary["samples_per_image"] == pytest.approx(float(whole.samples.double().mean()))
    assert [rows[i][6] for i in range(12)] == whole.samples.tolist()

    with pytest.raises(KeyboardInterrupt):
        engine.certify_dataset(Crashes(after=counter.calls // 2), (images, labels), out=tmp_path / "part.tsv", **common)
    _, partial = read_log(tmp_path / "part.tsv")
    assert 0 < len(partial) < 12
    resumed = engine.certify_dataset(Threshold(0.45), (images, labels), out=tmp_path / "part.tsv", **common)
    _, rows_resumed = read_log(tmp_path / "part.tsv")
    assert sorted(rows_resumed) == list(range(12))
    for i in range(12):
        assert rows_resumed[i][:5] == rows[i][:5] and rows_resumed[i][6] == rows[i][6]
    assert resumed.samples.tolist() == whole.samples.tolist()
    other = {"radius_tol": 0.1} if "radii" in kw else {"radii": [0, 0.2]}
    with pytest.raises(ResultsError, match="other settings"):
        engine.certify_dataset(Threshold(0.45), (images, labels), out=tmp_path / "part.tsv",
                               **{**common, "radii": None, "radius_tol": None, **other})


def test_command_line(tmp_path):
    from engine import cli, models

    torch.manual_seed(0)
    ckpt = tmp_path / "lenet.safetensors"
    models.save(models.lenet_mnist(), ckpt, sigma=0.5)
    base = ["certify", "--checkpoint", str(ckpt), "--dataset", "mnist", "--n0", "10", "--n", "800", "--skip", "25",
            "--max", "100", "--quiet"]
    assert cli.main([*base, "--out", str(tmp_path / "d.tsv"), "--sampling", "adaptive", "--radii", "0.5,0,0.25"]) == 0
    summary, rows = read_log(tmp_path / "d.tsv")
    assert summary["settings"]["radii"] == [0, 0.25, 0.5] and summary["settings"]["mode"] == "decision"
    assert sorted(rows) == [0, 25, 50, 75] and all(r[3] in (0, 0.25, 0.5) and 10 < r[6] <= 810 for r in rows.values())
    assert cli.main([*base, "--out", str(tmp_path / "r.tsv"), "--sampling", "adaptive"]) == 0
    assert read_log(tmp_path / "r.tsv")[0]["settings"]["radius_tol"] == adaptive.DEFAULT_RADIUS_TOL
    for extra, match in ((["--radii", "0,0.5"], "--radii applies to --sampling adaptive only"),
                         (["--sampling", "adaptive", "--radii", "0", "--radius-tol", "0.1"], "not both")):
        proc = subprocess.run([sys.executable, "-m", "engine", *base, "--out", str(tmp_path / "x.tsv"), *extra],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and match in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert not (tmp_path / "x.tsv").exists()
    for bad in ("0,-1", "a,b", "0.5,0.5", ""):
        with pytest.raises(SystemExit):
            cli.main([*base, "--out", str(tmp_path / "y.tsv"), "--sampling", "adaptive", "--radii", bad])


def test_adaptive_shards_merge_into_the_whole_run(tmp_path):
    from engine import cli, models

    torch.manual_seed(0)
    ckpt = tmp_path / "lenet.safetensors"
    models.save(models.lenet_mnist(), ckpt, sigma=0.5)
    base = ["certify", "--checkpoint", str(ckpt), "--dataset", "mnist", "--n0", "10", "--n", "400", "--skip", "20",
            "--max", "100", "--quiet", "--sampling", "adaptive", "--radii", "0,0.25"]
    for k in (0, 1):
        assert cli.main([*base, "--shard", str(k), "--num-shards", "2", "--out", str(tmp_path / f"s{k}.tsv")]) == 0
    assert cli.main(["merge", str(tmp_path / "s0.tsv"), str(tmp_path / "s1.tsv"), "--out", str(tmp_path / "m.tsv")]) == 0
    summary, rows = read_log(tmp_path / "m.tsv")
    assert (tmp_path / "m.tsv").read_text().splitlines()[0] == HEADER_SAMPLES and sorted(rows) == [0, 20, 40, 60, 80]
    parts = {**read_log(tmp_path / "s0.tsv")[1], **read_log(tmp_path / "s1.tsv")[1]}
    assert rows == parts and summary["samples_per_image"] == pytest.approx(np.mean([r[6] for r in rows.values()]))


def test_certify_dataset_rows_do_not_depend_on_batches_or_chunks():
    torch.manual_seed(2)
    images = (torch.rand(10, 1, 3, 3) * 255).round().to(torch.uint8)
    labels = torch.randint(0, 2, (10,))
    kw = dict(sigma=0.3, n0=20, n=1500, alpha=0.01, seed=9, sampling="adaptive", radii=[0, 0.2, 0.4], progress=False,
              backend="torch")
    runs = [engine.certify_dataset(Threshold(0.45), (images, labels), batch_size=bs, images_per_chunk=c, **kw)
            for bs, c in ((1000, None), (7, 3), (1, 1), (64, 10))]
    for other in runs[1:]:
        for f in ("prediction", "radius", "samples"):
            assert torch.equal(getattr(runs[0], f), getattr(other, f)), f


@pytest.mark.parametrize("kw", [{"radii": [0.25, 0.5]}, {"radius_tol": 0.05}], ids=["grid-above-0", "radius"])
def test_an_image_certifiable_below_the_grid_is_not_left_abstaining(kw):
    """p_A = 0.53: fixed sampling certifies it at a tiny radius; adaptive sampling must not stop it uncertified
    (radius 0 below the grid, or radius mode's tolerance, are not reasons to abstain)."""
    x = torch.full((12, 1, 2, 2), 0.5)
    x[:, 0, 0, 0] = 0.5 + 0.25 * float(stats.norm.ppf(0.53))
    fixed = engine.certify(Threshold(0.5), x, sigma=0.25, n0=100, n=100_000, alpha=0.001, backend="torch")
    res = engine.certify(Threshold(0.5), x, sigma=0.25, n0=100, n=100_000, alpha=0.001, backend="torch",
                         sampling="adaptive", **kw)
    # the same selection samples: the images whose n0 samples picked class 1 are certified by both
    picked = res.counts_selection.argmax(1) == 1
    assert torch.equal(picked, fixed.counts_selection.argmax(1) == 1) and int(picked.sum()) >= 6
    assert (fixed.prediction[picked] == 1).all()
    assert int((res.prediction[picked] == 1).sum()) >= int(picked.sum()) - 1  # the counts at the looks are random


def test_empty_batch_with_discrete_noise():
    res = engine.certify(Threshold(), torch.zeros(0, 1, 2, 2), sigma=0.25, n=10, noise="discrete")
    assert len(res) == 0


def test_a_log_of_the_other_sampling_is_refused_as_other_settings(tmp_path):
    from engine.results import HEADER, ResultsLog

    fixed = {"sigma": 0.25, "n0": 10, "n": 100}
    adaptive_settings = {**fixed, **adaptive.make_plan(100, 0.001, [0, 0.5]).describe()}
    log = ResultsLog(tmp_path / "r.tsv", fixed)
    log.append(3, 1, 1, 0.4999996, 1.0)
    assert (tmp_path / "r.tsv").read_text().splitlines()[1].split("\t")[3] == "0.499999"  # rounded down
    assert log.rows[3][3] == 0.499999
    with pytest.raises(ResultsError, match="other settings"):
        ResultsLog(tmp_path / "r.tsv", adaptive_settings)
    ResultsLog(tmp_path / "h.tsv", fixed)  # a log with its header only (a run killed before its first image)
    taken = ResultsLog(tmp_path / "h.tsv", adaptive_settings)
    taken.append(0, 1, 1, 0.5, 1.0, samples=110)
    assert (tmp_path / "h.tsv").read_text().splitlines() == [HEADER_SAMPLES, "0\t1\t1\t0.500000\t1\t1.0000\t110"]
    assert HEADER != HEADER_SAMPLES
    summary = taken.summary()
    assert set(summary["certified_accuracy"]) == {"0", "0.5"}  # decision mode: accuracy at its grid
