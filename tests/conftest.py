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
    _check_interpreter_numpy()


def _check_interpreter_numpy():
    """Triton 3.6's interpreter turns 1-element arrays into loop bounds with int(), which NumPy 2.4 refuses: every
    kernel with a runtime loop bound would fail with "only 0-dimensional arrays can be converted". Say so once."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy
        import triton
    except ImportError:
        return

    def version(module):
        return tuple(int(p) for p in module.__version__.split("+")[0].split(".")[:2])

    if version(triton) < (3, 7) and version(numpy) >= (2, 4):
        raise pytest.UsageError(f"triton {triton.__version__}'s interpreter does not run with numpy {numpy.__version__} "
                                "(int() of 1-element arrays, refused since numpy 2.4): install numpy<2.4 to run the tests "
                                "under TRITON_INTERPRET=1, or triton>=3.7")


@pytest.fixture(scope="module")
def tiny():
    """Tiny PACD data: 300 training and 100 validation images of classes 3, 5, 8 from the shipped MNIST subset."""
    from engine import data

    x, y = data.load_mnist(data.embedded_mnist_root(), "train")
    keep = (y == 3) | (y == 5) | (y == 8)
    x, y = x[keep], y[keep]
    return (x[100:400], y[100:400]), (x[:100], y[:100])
