"""Loaders on the shipped MNIST subset and on synthetic CIFAR-10 files in the true formats."""

import os
import pickle

import numpy as np
import pytest
import torch

from engine import data


def test_embedded_mnist_subset():
    root = data.embedded_mnist_root()
    x, y = data.load_mnist(root, "train")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert set(y.unique().tolist()) == set(range(10)) and int(y.bincount().min()) > 800
    xt, yt = data.load_mnist(root, "test")
    assert xt.shape == (2000, 1, 28, 28) and yt.shape == (2000,)
    # real digits: mostly black background, some bright strokes
    assert 0.1 < float((x > 128).float().mean()) < 0.25 and float((x == 0).float().mean()) > 0.7
    # the subset is what PROVENANCE.txt says: rows of the canonical files at the listed indices
    idx = np.loadtxt(root / "test-indices.txt", dtype=np.int64)
    assert idx.shape == (2000,) and np.all(np.diff(idx) > 0)


def test_mnist_matches_canonical_files_when_available():
    canonical = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")
    if not os.path.isdir(canonical):
        pytest.skip("../shared/data/mnist not present (only on the development machine)")
    root = data.embedded_mnist_root()
    full_x, full_y = data.load_mnist(canonical, "test")
    idx = torch.from_numpy(np.loadtxt(root / "test-indices.txt", dtype=np.int64))
    x, y = data.load_mnist(root, "test")
    assert torch.equal(full_x[idx], x) and torch.equal(full_y[idx], y)


def _write_mnist(root, n=7, gz=True, labels=None):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labs = np.asarray(labels if labels is not None else rng.integers(0, 10, n), dtype=np.uint8)
    ext = ".gz" if gz else ""
    data.write_idx(root / f"t10k-images-idx3-ubyte{ext}", imgs)
    data.write_idx(root / f"t10k-labels-idx1-ubyte{ext}", labs)
    return imgs, labs


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_roundtrip_gz_and_raw(tmp_path, gz):
    imgs, labs = _write_mnist(tmp_path, gz=gz)
    x, y = data.load_mnist(tmp_path, "test")
    assert np.array_equal(x[:, 0].numpy(), imgs) and np.array_equal(y.numpy(), labs)


def test_mnist_bad_files(tmp_path):
    _write_mnist(tmp_path, gz=False)
    img = tmp_path / "t10k-images-idx3-ubyte"
    raw = img.read_bytes()
    img.write_bytes(raw[:-100])  # truncated
    with pytest.raises(data.DataError, match="truncated"):
        data.load_mnist(tmp_path, "test")
    img.write_bytes(b"\x00\x00\x08\x01" + raw[4:])  # labels magic on the images file
    with pytest.raises(data.DataError, match="magic"):
        data.load_mnist(tmp_path, "test")
    img.write_bytes(b"\x12\x34\x56\x78" + raw[4:])  # garbage magic
    with pytest.raises(data.DataError, match="magic"):
        data.load_mnist(tmp_path, "test")
    img.write_bytes(raw)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(data.DataError, match="t10k-labels"):
        data.load_mnist(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        data.load_mnist(tmp_path, "val")


def test_mnist_truncated_gzip(tmp_path):
    _write_mnist(tmp_path, gz=True)
    img = tmp_path / "t10k-images-idx3-ubyte.gz"
    img.write_bytes(img.read_bytes()[:200])
    with pytest.raises(data.DataError, match="truncated|damaged"):
        data.load_mnist(tmp_path, "test")


def test_mnist_label_count_mismatch(tmp_path):
    _write_mnist(tmp_path, n=7, gz=False, labels=[1, 2, 3])
    with pytest.raises(data.DataError, match="labels"):
        data.load_mnist(tmp_path, "test")


def _cifar_arrays(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def _write_cifar_bin(folder, split, n=5):
    folder.mkdir(parents=True, exist_ok=True)
    files = data.CIFAR_BIN_FILES[split]
    arrays = []
    for k, name in enumerate(files):
        imgs, labs = _cifar_arrays(n, k)
        rec = np.concatenate([labs.astype(np.uint8)[:, None], imgs], axis=1)
        (folder / name).write_bytes(rec.tobytes())
        arrays.append((imgs, labs))
    return arrays


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_binary(tmp_path, split, nested):
    folder = tmp_path / "cifar-10-batches-bin" if nested else tmp_path
    arrays = _write_cifar_bin(folder, split)
    x, y = data.load_cifar10(tmp_path, split)
    assert x.shape == (5 * len(arrays), 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    want = np.concatenate([a[0] for a in arrays]).reshape(-1, 3, 32, 32)
    assert np.array_equal(x.numpy(), want) and np.array_equal(y.numpy(), np.concatenate([a[1] for a in arrays]))


def test_cifar_binary_truncated_and_incomplete(tmp_path):
    _write_cifar_bin(tmp_path, "test")
    f = tmp_path / "test_batch.bin"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(data.DataError, match="truncated"):
        data.load_cifar10(tmp_path, "test")
    _write_cifar_bin(tmp_path, "train")
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(data.DataError, match="data_batch_3"):
        data.load_cifar10(tmp_path, "train")
    with pytest.raises(data.DataError, match="no CIFAR-10"):
        data.load_cifar10(tmp_path / "empty", "test")


def _write_cifar_py(folder, split, n=4, protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, name in enumerate(data.CIFAR_PY_FILES[split]):
        imgs, labs = _cifar_arrays(n, 10 + k)
        batch = {b"batch_label": b"synthetic", b"labels": labs.tolist(), b"data": imgs, b"filenames": [b"a.png"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        out.append((imgs, labs))
    return out


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_python_version(tmp_path, protocol):
    arrays = _write_cifar_py(tmp_path / "cifar-10-batches-py", "test", protocol=protocol)
    x, y = data.load_cifar10(tmp_path, "test")
    assert np.array_equal(x.numpy(), arrays[0][0].reshape(-1, 3, 32, 32)) and np.array_equal(y.numpy(), arrays[0][1])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/engine_pwned",))


def test_cifar_pickle_refuses_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_py(folder, "test")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [1]}, protocol=2))
    with pytest.raises(data.DataError, match="refusing to load"):
        data.load_cifar10(tmp_path, "test")
    assert not os.path.exists("/tmp/engine_pwned")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}))
    with pytest.raises(data.DataError, match="float32|dtype"):
        data.load_cifar10(tmp_path, "test")
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(data.DataError):
        data.load_cifar10(tmp_path, "test")


def test_load_dataset_dispatch(tmp_path):
    x, _ = data.load_dataset("mnist", None, "test")
    assert x.shape[1:] == (1, 28, 28)
    with pytest.raises(data.DataError, match="data-root"):
        data.load_dataset("cifar10", None, "test")
    with pytest.raises(ValueError, match="dataset"):
        data.load_dataset("imagenet", tmp_path, "test")


def test_to_float():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert data.to_float(x).tolist() == [[[[0.0, 1.0]]]]
    with pytest.raises(data.DataError):
        data.to_float(x.float())
