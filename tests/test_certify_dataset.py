"""engine.certify_dataset: the library's data-set certification (the command line and evaluate call it)."""

import ast
from pathlib import Path

import pytest
import torch
from kernel_testing import assert_no_near_ties

import engine
from engine import data, models, noise
from engine.validate import InputError


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = models.lenet_mnist().eval()
    with torch.no_grad():
        model[-1].weight.mul_(20)
    images, labels = data.load_mnist(data.embedded_mnist_root(), "test")
    return model, images[:40], labels[:40]


def test_equals_certify_per_image_and_packs_images(setup):
    """Chunks of several images give the rows certify gives image by image (noise keyed by data-set index)."""
    model, images, labels = setup
    ids = [3, 7, 11, 19, 23, 31]
    streams = {noise.STREAM_SELECTION: 10, noise.STREAM_ESTIMATION: 60}
    assert_no_near_ties(model, data.to_float(images[ids]), torch.tensor(ids), streams, seed=5, sigma=0.5)
    res = engine.certify_dataset(model, (images, labels), sigma=0.5, n0=10, n=60, alpha=0.01, indices=ids, seed=5,
                                 images_per_chunk=4, progress=False)
    assert res.indices.tolist() == ids and res.labels.tolist() == labels[ids].tolist()
    for k, i in enumerate(ids):
        one = engine.certify(model, data.to_float(images[i : i + 1]), sigma=0.5, n0=10, n=60, alpha=0.01, seed=5,
                             image_ids=torch.tensor([i]), progress=False)
        assert int(one.prediction[0]) == int(res.prediction[k]) and float(one.radius[0]) == float(res.radius[k])
    assert res.summary["images"] == len(ids) and 0 <= res.summary["acr"]


def test_log_resume_and_an_indexable_dataset(setup, tmp_path):
    model, images, labels = setup
    out = tmp_path / "r.tsv"
    pairs = [(data.to_float(images[i : i + 1])[0], int(labels[i])) for i in range(len(labels))]  # a torch-style data set
    kw = dict(sigma=0.5, n0=10, n=60, alpha=0.01, out=out, progress=False, images_per_chunk=3)
    first = engine.certify_dataset(model, pairs, indices=range(0, 10), **kw)
    assert len(out.read_text().splitlines()) == 11 and first.summary["planned_images"] == 10
    again = engine.certify_dataset(model, (images, labels), indices=range(0, 10), **kw)  # resumed: nothing redone
    assert again.radius.tolist() == first.radius.tolist() and again.prediction.tolist() == first.prediction.tolist()
    assert torch.allclose(again.seconds, first.seconds, atol=1e-4)  # (the log keeps 4 decimals of seconds)


def test_bad_selections(setup):
    model, images, labels = setup
    kw = dict(sigma=0.5, n0=5, n=10, progress=False)
    with pytest.raises(InputError, match="empty"):
        engine.certify_dataset(model, (images, labels), indices=[], **kw)
    with pytest.raises(InputError, match="outside the data set"):
        engine.certify_dataset(model, (images, labels), indices=[40], **kw)
    with pytest.raises(InputError, match="repeat"):
        engine.certify_dataset(model, (images, labels), indices=[1, 1], **kw)
    with pytest.raises(InputError, match="indexable"):
        engine.certify_dataset(model, 5, **kw)


def test_the_library_does_not_import_the_command_line():
    root = Path(engine.__file__).parent
    for path in root.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                name = ("." * node.level) + (node.module or "")
                assert not name.endswith("cli") and name != "engine.cli", f"{path} imports {name}"


def test_an_indexable_dataset_is_read_only_where_certified(setup):
    model, images, labels = setup

    class Counting:
        reads = 0

        def __len__(self):
            return 1000

        def __getitem__(self, i):
            Counting.reads += 1
            return data.to_float(images[i % 40 : i % 40 + 1])[0], int(labels[i % 40])

    res = engine.certify_dataset(model, Counting(), sigma=0.5, n0=5, n=10, indices=[0, 1], progress=False)
    assert len(res) == 2 and Counting.reads <= 6  # the first item, then each certified one for its label and image
