import numpy as np
import pytest
import torch

from engine import metrics


def test_acr_and_certified_accuracy_by_hand():
    pred = torch.tensor([0, 1, -1, 2, 3])
    radius = torch.tensor([0.5, 1.0, 0.0, 2.0, 0.3], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 3])
    # correct: images 0, 1, 4 -> radii 0.5 + 1.0 + 0.3; wrong / abstain count 0
    assert metrics.acr(pred, radius, labels) == pytest.approx((0.5 + 1.0 + 0.3) / 5)
    acc = metrics.certified_accuracy(pred, radius, labels, [0.0, 0.3, 0.5, 0.75, 1.0, 1.5])
    assert acc.dtype == torch.float64
    np.testing.assert_allclose(acc.numpy(), [3 / 5, 3 / 5, 2 / 5, 1 / 5, 1 / 5, 0.0])
    s = metrics.summary(pred, radius, labels)
    assert s["abstain_rate"] == pytest.approx(0.2) and s["clean_accuracy"] == pytest.approx(0.6)
    assert s["certified_accuracy"]["0.5"] == pytest.approx(0.4) and len(s["certified_accuracy"]) == 9


def test_accepts_numpy_and_lists():
    assert metrics.acr([1, 2], [0.5, 0.5], [1, 0]) == pytest.approx(0.25)
    assert metrics.certified_accuracy(np.array([1]), np.array([0.2]), np.array([1]), [0.1, 0.3]).tolist() == [1.0, 0.0]


def test_errors():
    with pytest.raises(ValueError, match="equal length"):
        metrics.acr([1, 2], [0.5], [1, 2])
    with pytest.raises(ValueError, match="radius"):
        metrics.acr([1], [-0.5], [1])
    with pytest.raises(ValueError, match="zero images"):
        metrics.acr([], [], [])
