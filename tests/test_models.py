import json

import pytest
import torch

from engine import models


@pytest.mark.parametrize(
    "name,shape,macs",
    [
        ("lenet", (1, 28, 28), 2_293_000),
        ("mlp", (1, 28, 28), 784 * 1024 + 1024 * 1024 + 10240),
        ("resnet20", (3, 32, 32), None),
        ("resnet110", (3, 32, 32), None),
    ],
)
def test_architectures(name, shape, macs):
    model = models.build(name).eval()
    out = model(torch.rand((3,) + shape))
    assert out.shape == (3, 10)
    assert isinstance(model[0], models.Normalize)
    if macs is not None:
        assert models.count_macs(model, shape) == macs


def test_resnet110_cost_matches_literature():
    # ALGORITHMS.md: ResNet-110 (CIFAR) is about 2.53e8 multiply-adds per forward pass
    macs = models.count_macs(models.resnet_cifar(110), (3, 32, 32))
    assert abs(macs - 2.53e8) / 2.53e8 < 0.01
    params = sum(p.numel() for p in models.resnet_cifar(110).parameters())
    assert 1.7e6 < params < 1.75e6


def test_bad_depth():
    with pytest.raises(ValueError, match="6n"):
        models.resnet_cifar(21)
    with pytest.raises(ValueError, match="unknown architecture"):
        models.build("vgg")


def test_normalize_first():
    model = models.lenet_mnist()
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(model[0](x), (x - 0.1307) / 0.3081)
    with pytest.raises(ValueError):
        models.Normalize([0.5], [0.0])


@pytest.mark.parametrize("name", ["lenet", "resnet20", "mlp"])
def test_save_load_roundtrip(tmp_path, name):
    model = models.build(name)
    if name == "resnet20":  # non-trivial BatchNorm statistics
        model.train()
        model(torch.rand(8, 3, 32, 32))
    model.eval()
    path = tmp_path / "m.safetensors"
    models.save(model, path, classes=list("0123456789"), sigma=0.25, method="gaussian")
    loaded = models.load(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand((2,) + ((3, 32, 32) if name == "resnet20" else (1, 28, 28)))
    assert torch.equal(model(x), loaded.eval()(x))
    meta = loaded.engine_meta
    assert meta["meta"]["sigma"] == 0.25 and meta["meta"]["classes"][3] == "3"
    assert meta["normalization"]["mean"] == pytest.approx(list(model[0].mean.flatten().tolist()))
    assert models.read_meta(path)["arch"] == model.engine_arch["name"]
    assert not path.with_name("m.safetensors.tmp").exists()


def test_checkpoint_errors(tmp_path):
    with pytest.raises(models.CheckpointError, match="no such"):
        models.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(models.CheckpointError, match="safetensors"):
        models.load(bad)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(models.CheckpointError, match="metadata"):
        models.load(tmp_path / "plain.safetensors")
    header = {"format": models.FORMAT, "arch": "lenet_mnist", "arch_kwargs": {}, "normalization": None, "meta": {}}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "wrong.safetensors"), metadata={"engine": json.dumps(header)})
    with pytest.raises(models.CheckpointError, match="do not match"):
        models.load(tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="engine_arch"):
        models.save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="JSON"):
        models.save(models.lenet_mnist(), tmp_path / "x.safetensors", bad=object())


def test_saved_files_get_the_umask_permissions_and_replace_atomically(tmp_path):
    import os
    import stat

    from engine.fileio import default_mode

    path = tmp_path / "m.safetensors"
    old = os.umask(0o022)
    try:
        assert default_mode() == 0o644
        models.save(models.mlp_mnist(), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # safetensors alone writes 0600
        models.save(models.lenet_mnist(), path)  # replaces the file in place
        os.umask(0o077)
        assert default_mode() == 0o600
        models.save(models.mlp_mnist(), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary left behind
    assert models.load(path).engine_arch["name"] == "mlp_mnist"
