import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU interpreter in tests

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer statistical or end-to-end tests")


@pytest.fixture(scope="module")
def tiny():
    """Tiny PACD data: 300 training and 100 validation images of classes 3, 5, 8 from the shipped MNIST subset."""
    from engine import data

    x, y = data.load_mnist(data.embedded_mnist_root(), "train")
    keep = (y == 3) | (y == 5) | (y == 8)
    x, y = x[keep], y[keep]
    return (x[100:400], y[100:400]), (x[:100], y[:100])
