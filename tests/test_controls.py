"""Random control poisons (engine.pacd.random_poison, poison-random): each kind's definition, its statistics,
reproducibility, storage, and the errors."""

import math

import pytest
import torch

from engine import cli, data
from engine.pacd import PoisonSet, random_poison
from engine.validate import InputError

EPS = 0.1


@pytest.fixture(scope="module")
def train():
    images, labels = data.load_mnist(data.embedded_mnist_root(), "train")
    return data.split_validation(images, labels, 5000)[0]


def _x0(ps, train):
    return ps._originals(train)


def _half(count: int, total: int) -> None:
    """count / total is 1/2 within 6 standard deviations (a fair coin cannot fail this by chance: p < 2e-9)."""
    assert total > 1000
    assert abs(count - total / 2) < 6 * math.sqrt(total / 4), (count, total)


def test_vertex_moves_every_pixel_by_eps_inward_at_the_bounds(train):
    ps = random_poison(train, target_class=8, eps=EPS, kind="vertex", seed=1)
    x0 = _x0(ps, train)
    assert torch.equal(ps.indices, (train[1] == 8).nonzero().flatten()) and ps.method == "control:vertex"
    d = ps.images - x0
    assert torch.allclose(d.abs(), torch.full_like(d, EPS), atol=1e-6)  # every pixel at the vertex
    assert float(ps.images.min()) >= 0 and float(ps.images.max()) <= 1
    assert bool((d[x0 > 1 - EPS] < 0).all()) and bool((d[x0 < EPS] > 0).all())  # inward where one way leaves [0, 1]
    free = (x0 >= EPS) & (x0 <= 1 - EPS)
    _half(int((d[free] > 0).sum()), int(free.sum()))


def test_sign_is_a_coin_clipped_to_the_unit_interval(train):
    ps = random_poison(train, target_class=8, eps=EPS, kind="sign", seed=1)
    x0 = _x0(ps, train)
    up, down = (x0 + EPS).clamp(0, 1), (x0 - EPS).clamp(0, 1)
    is_up, is_down = torch.isclose(ps.images, up, atol=1e-6), torch.isclose(ps.images, down, atol=1e-6)
    assert bool((is_up | is_down).all())
    black = x0 == 0  # half the black background is pushed down and stays black
    _half(int((ps.images[black] == 0).sum()), int(black.sum()))


def test_uniform_stays_in_the_box_and_is_uniform(train):
    ps = random_poison(train, target_class=8, eps=EPS, kind="uniform", seed=2)
    x0 = _x0(ps, train)
    d = (ps.images - x0)[(x0 >= EPS) & (x0 <= 1 - EPS)]  # pixels where no clipping happens
    assert float(d.abs().max()) <= EPS + 1e-6 and d.numel() > 10_000
    u = torch.sort((d.double() + EPS) / (2 * EPS)).values  # Kolmogorov-Smirnov against U(0, 1)
    n = u.numel()
    ks = float(torch.maximum(torch.arange(1, n + 1) / n - u, u - torch.arange(n) / n).max())
    assert ks < 1.95 / math.sqrt(n)  # the 0.001 critical value: a uniform sample fails this once in 1000 runs


def test_shift_brightens_every_pixel_and_ignores_the_seed(train):
    a = random_poison(train, target_class=8, eps=EPS, kind="shift", seed=0)
    b = random_poison(train, target_class=8, eps=EPS, kind="shift", seed=5)
    x0 = _x0(a, train)
    assert torch.equal(a.images, b.images) and a.settings["seed"] is None
    assert torch.allclose(a.images, (x0 + EPS).clamp(max=1), atol=1e-6)


def test_twin_keeps_the_poisons_magnitudes_with_random_signs(train):
    vertex = random_poison(train, target_class=8, eps=EPS, kind="uniform", seed=3)  # any poison will do
    crafted = PoisonSet(vertex.indices, vertex.images, vertex.labels, vertex.clean_sha256, EPS, 0.25, "gaussian", 8,
                        {"outer_steps": 7})
    twin = random_poison(train, target_class=8, eps=EPS, kind="twin", seed=4, like=crafted)
    x0 = _x0(twin, train)
    m, mt = (crafted.images - x0).abs(), (twin.images - x0).abs()
    assert torch.allclose(m, mt, atol=1e-6)  # the same energy, pixel by pixel
    assert twin.sigma == 0.25 and twin.settings["like"]["method"] == "gaussian"
    free = (x0 >= EPS) & (x0 <= 1 - EPS) & (m > 1e-3)
    same = torch.sign(crafted.images - x0) == torch.sign(twin.images - x0)
    _half(int(same[free].sum()), int(free.sum()))  # the direction is independent of the poison's


def test_seeded_reproducible_and_seeds_differ(train):
    a = random_poison(train, target_class=3, eps=EPS, kind="vertex", seed=7)
    b = random_poison(train, target_class=3, eps=EPS, kind="vertex", seed=7)
    c = random_poison(train, target_class=3, eps=EPS, kind="vertex", seed=8)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.target_class == 3 and bool((a.labels == 3).all())


@pytest.mark.parametrize("kind", ["vertex", "sign", "shift"])
def test_vertex_controls_store_bit_for_bit_as_sign(train, tmp_path, kind):
    ps = random_poison(train, target_class=8, eps=EPS, kind=kind, seed=1)
    path = tmp_path / "c.safetensors"
    ps.encode(train, "sign").save(path)
    back = PoisonSet.load(path, train)
    assert back.encoding == "sign" and torch.equal(back.images.view(torch.int32), ps.images.view(torch.int32))
    x, y = back.apply(train)
    assert torch.equal(y, train[1])


def test_bad_arguments(train):
    with pytest.raises(InputError, match="kind must be one of"):
        random_poison(train, target_class=8, eps=EPS, kind="gauss")
    with pytest.raises(InputError, match="needs like"):
        random_poison(train, target_class=8, eps=EPS, kind="twin")
    with pytest.raises(InputError, match="eps must be"):
        random_poison(train, target_class=8, eps=0, kind="vertex")
    with pytest.raises(InputError, match="no training image"):
        random_poison(train, target_class=12, eps=EPS, kind="vertex")
    other = random_poison(train, target_class=3, eps=EPS, kind="vertex")
    with pytest.raises(InputError, match="class 3"):
        random_poison(train, target_class=8, eps=EPS, kind="twin", like=other)


def test_cli_poison_random(tmp_path, capsys):
    v = tmp_path / "v.safetensors"
    assert cli.main(["poison-random", "--kind", "uniform", "--target-class", "8", "--eps", "0.1", "--seed", "3",
                     "--out", str(v)]) == 0
    split = data.split_validation(*data.load_mnist(data.embedded_mnist_root(), "train"), 5000)[0]
    ps = PoisonSet.load(v, split)
    assert ps.method == "control:uniform" and ps.encoding == "int8" and ps.settings["control"] == "uniform"
    t = tmp_path / "t.safetensors"
    assert cli.main(["poison-random", "--kind", "twin", "--like", str(v), "--out", str(t)]) == 0
    twin = PoisonSet.load(t, split)
    assert twin.target_class == 8 and twin.eps == 0.1 and twin.settings["like"]["method"] == "control:uniform"
    capsys.readouterr()
    assert cli.main(["poison-random", "--kind", "twin", "--target-class", "8", "--eps", "0.1", "--out",
                     str(tmp_path / "x.safetensors")]) == 2
    assert cli.main(["poison-random", "--kind", "vertex", "--eps", "0.1", "--out", str(tmp_path / "y.safetensors")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "--like" in err[0] and "--target-class" in err[1]
