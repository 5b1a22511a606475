"""engine.geometry: where a poison sits in its eps box and [0, 1], and how two poisons agree."""

import math

import pytest
import torch

import engine
from engine import data
from engine import geometry as geo
from engine.pacd import PoisonError, _hash_clean


def test_geometry_counts_each_bound():
    """Five pixels, one of each kind, counted by hand: at 0 and unmoved (a [0, 1] bound), moved by +eps and -eps
    (the eps bound), moved by eps / 2 inside, and clipped at 1 after eps / 2 (a [0, 1] bound only)."""
    x0 = torch.tensor([0.0, 0.5, 0.3, 0.5, 0.95], dtype=torch.float64)
    u = torch.tensor([0.0, 0.6, 0.2, 0.45, 1.0], dtype=torch.float64)
    g = geo.geometry(u, x0, eps=0.1)
    assert g["pixels"] == 5
    assert g["at_eps_bound"] == pytest.approx(2 / 5)
    assert g["at_unit_bound_only"] == pytest.approx(2 / 5)
    assert g["inside"] == pytest.approx(1 / 5)
    assert g["mean_abs"] == pytest.approx((0 + 0.1 + 0.1 + 0.05 + 0.05) / 5)
    assert g["mean_abs_inside"] == pytest.approx(0.05)
    assert g["max_abs"] == pytest.approx(0.1)
    all_bound = geo.geometry(torch.tensor([0.6, 0.0]), torch.tensor([0.5, 0.0]), eps=0.1)
    assert all_bound["inside"] == 0 and all_bound["mean_abs_inside"] is None
    with pytest.raises(ValueError, match="differ in shape"):
        geo.geometry(u, x0[:4], eps=0.1)


def test_agreement_by_hand():
    a = torch.tensor([0.1, -0.1, 0.005, 0.1])
    b = torch.tensor([0.1, 0.1, 0.1, 0.0])
    r = geo.agreement(a, b, min_abs=0.01)
    assert r["moved_by_both"] == pytest.approx(0.5)  # pixels 0 and 1: one same sign, one opposite
    assert r["sign_agreement"] == pytest.approx(0.5)
    dot = 0.01 - 0.01 + 0.0005
    assert r["cosine"] == pytest.approx(dot / (math.sqrt(0.030025) * math.sqrt(0.03)))
    free = torch.tensor([False, True, True, True])
    assert geo.agreement(a, b, min_abs=0.01, free=free)["free_sign_agreement"] == 0.0  # pixel 1 only: opposite
    assert geo.agreement(a, b, min_abs=0.01, free=~free)["free_sign_agreement"] == 1.0  # pixel 0 only: same
    assert "free_sign_agreement" not in r
    with pytest.raises(ValueError, match="free mask"):
        geo.agreement(a, b, free=free[:3])
    none = geo.agreement(torch.zeros(3), b[:3])
    assert none["sign_agreement"] is None and none["cosine"] is None and none["moved_by_both"] == 0
    with pytest.raises(ValueError, match="different shapes"):
        geo.agreement(a, b[:3])


def _poison(train, target, u_of):
    images, labels = train
    idx = (labels == target).nonzero().flatten()
    x0 = data.to_float(images[idx])
    return engine.PoisonSet(idx.clone(), u_of(x0).to(torch.float32), labels[idx].clone(), _hash_clean(images[idx], labels[idx]),
                            0.1, 0.5, "gaussian", target, {"total_outer_steps": 3, "solver": "cg"})


def test_report_on_poisons_of_the_embedded_split():
    """On the embedded MNIST split: a poison at +eps everywhere (clipped at 1) and its negation agree on no sign and
    have cosine between -1 and 0 (-1 where neither clips); a poison of other originals is refused with its name,
    and poisons of different images are not compared."""
    images, labels = data.load_mnist(data.embedded_mnist_root(), "train")
    train, _ = data.split_validation(images, labels, 1000)
    up = _poison(train, 8, lambda x: (x + 0.1).clamp(0, 1))
    down = _poison(train, 8, lambda x: (x - 0.1).clamp(0, 1))
    rep = geo.report({"up": up, "down": down}, train)
    x0 = data.to_float(train[0][up.indices]).double()
    g_up = rep["poisons"]["up"]
    assert g_up["images"] == len(up) and g_up["total_outer_steps"] == 3 and g_up["solver"] == "cg"
    assert g_up["at_eps_bound"] == pytest.approx(float((x0 <= 0.9 + 1e-4).double().mean()), abs=1e-9)
    assert g_up["at_eps_bound"] + g_up["at_unit_bound_only"] + g_up["inside"] == pytest.approx(1.0)
    pair = rep["pairs"]["up / down"]
    assert pair["sign_agreement"] == 0.0 and pair["free_sign_agreement"] == 0.0
    assert -1 < pair["cosine"] < 0
    assert rep["min_abs"] == 0.01 and rep["tol"] == 1e-4

    other = _poison(train, 3, lambda x: x)
    with pytest.raises(ValueError, match="different training images"):
        geo.report({"up": up, "other": other}, train)
    other_split, _ = data.split_validation(images, labels, 500)  # another split: other images at the indices
    with pytest.raises(PoisonError, match="up: labels at the poison indices differ"):
        geo.report({"up": up}, other_split)
    changed = train[0].clone()  # the same labels, one pixel changed in every 8
    changed[train[1] == 8, 0, 0, 0] ^= 1
    with pytest.raises(PoisonError, match="up: the training images at the poison indices are not the originals"):
        geo.report({"up": up}, (changed, train[1]))
