"""Bring your own model: state_dict / safetensors weights, register(), torchvision architectures, and the
CLI's --weights / --arch (certify, train, evaluate)."""

import json
import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from engine import cli, models
from engine.fileio import sha256_file
from engine.models import CheckpointError


def _run(args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env)


def _lenet(seed=0):
    torch.manual_seed(seed)
    model = models.lenet_mnist()
    with torch.no_grad():
        model[-1].weight.mul_(20)  # confident enough to certify something at tiny n
    return model.eval()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


CERTIFY = ["--dataset", "mnist", "--sigma", "0.5", "--n0", "10", "--n", "200", "--skip", "10", "--max", "60", "--quiet"]


class _Payload:
    """A pickle whose loading would create ``marker`` (builtins.open called by the unpickler)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"0.mean": torch.zeros(1), "payload": _Payload(marker)}, evil)
    # positive control: an ordinary unpickler would run the code and create the marker
    torch.load(evil, map_location="cpu", weights_only=False)
    assert marker.exists()
    marker.unlink()
    return evil, marker


# -- engine.models.load of weights from elsewhere --------------------------------------------------------------


def test_state_dict_loads_with_arch_and_needs_it(tmp_path):
    model = _lenet()
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"pass arch=NAME \(CLI: --arch NAME\)"):
        models.load(path)
    for name in ("lenet", "lenet_mnist"):
        loaded = models.load(path, arch=name)
        assert _same_weights(model, loaded)
        assert loaded.engine_meta["source"] == "state_dict" and loaded.engine_meta["arch"] == "lenet_mnist"
        x = torch.rand(3, 1, 28, 28)
        assert torch.equal(model(x), loaded.eval()(x))
    # a safetensors file without the engine's metadata: the same
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    with pytest.raises(CheckpointError, match="without the engine's metadata.*pass arch"):
        models.load(plain)
    loaded = models.load(plain, arch="lenet")
    assert _same_weights(model, loaded) and loaded.engine_meta["source"] == "safetensors"
    # the engine's own checkpoint as before; an arch that disagrees with its header is refused
    ckpt = tmp_path / "m.safetensors"
    models.save(model, ckpt)
    assert _same_weights(model, models.load(ckpt)) and _same_weights(model, models.load(ckpt, arch="lenet"))
    for wrong, kwargs in (("mlp", {}), ("lenet", {"num_classes": 5})):
        with pytest.raises(CheckpointError, match="engine checkpoint of lenet_mnist.*not of.*leave out arch"):
            models.load(ckpt, arch=wrong, **kwargs)
    models.save(models.lenet_mnist(num_classes=7), ckpt)  # the constructor's default (10 classes) counts too
    with pytest.raises(CheckpointError, match='engine checkpoint of lenet_mnist {"num_classes": 7}, not of lenet_mnist '
                                              '{"num_classes": 10}'):
        models.load(ckpt, arch="lenet")
    assert models.load(ckpt, arch="lenet", num_classes=7)[-1].out_features == 7
    resnet = models.resnet_cifar(20)
    models.save(resnet, ckpt)
    with pytest.raises(CheckpointError, match='not of resnet_cifar {"depth": 110'):
        models.load(ckpt, arch="resnet110")
    assert models.load(ckpt, arch="resnet20").engine_arch["kwargs"]["depth"] == 20
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        models.load(path, arch="vgg")


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    evil, marker = _malicious(tmp_path)
    with pytest.raises(CheckpointError, match=r"refused.*global _?(io|builtins)\.open.*nothing in it was run"):
        models.load(evil, arch="lenet")
    with pytest.raises(CheckpointError, match="refused"):
        models.load(evil)  # refused before the missing arch matters
    assert not marker.exists()
    # a whole pickled module (torch.save(model)) needs unpickling code too: refused, the class named
    whole = tmp_path / "whole.pt"
    torch.save(nn.Linear(2, 2), whole)
    with pytest.raises(CheckpointError, match=r"torch\.nn\.modules\.linear\.Linear.*state_dict"):
        models.load(whole, arch="lenet")
    # a raw pickle (not torch.save's format) and garbage: not loaded, said so
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=4))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a weights file at all")
    for path in (raw, garbage):
        with pytest.raises(CheckpointError, match="neither a safetensors file nor a PyTorch weights file"):
            models.load(path, arch="lenet")
    assert not marker.exists()


def test_cli_refuses_the_malicious_pickle(tmp_path):
    evil, marker = _malicious(tmp_path)
    proc = _run(["certify", "--weights", str(evil), "--arch", "lenet", *CERTIFY, "--out", str(tmp_path / "r.tsv")])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused" in lines[0] and ".open" in lines[0]
    assert not marker.exists() and not (tmp_path / "r.tsv").exists()


@pytest.mark.parametrize("wrap", ["state_dict", "model_state_dict", "model", "module.", "model+module."])
def test_common_wrappers(tmp_path, wrap):
    model = _lenet(1)
    sd = model.state_dict()
    if "module." in wrap:
        sd = OrderedDict(("module." + k, v) for k, v in sd.items())
    obj = sd if wrap == "module." else {wrap.split("+")[0]: sd, "epoch": 7, "optimizer": {"lr": 0.1}}
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    assert _same_weights(model, models.load(path, arch="lenet"))


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"epoch": 3, "weights": _lenet().state_dict()}, path)
    with pytest.raises(CheckpointError, match="not a state_dict.*'epoch'.*'state_dict' / 'model_state_dict' / 'model'"):
        models.load(path, arch="lenet")
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a state_dict.*list"):
        models.load(path, arch="lenet")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        models.load(tmp_path / "missing.pt", arch="lenet")


def test_mismatched_weights_one_short_error(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(models.lenet_mnist().state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        models.load(path, arch="mlp")
    text = str(info.value)
    assert "weights do not match mlp_mnist" in text
    assert "4 missing (2.weight, 2.bias, 6.weight, 6.bias)" in text
    assert "6 unexpected (1.weight, 1.bias, 8.weight, 8.bias and 2 more)" in text
    assert "2 of the wrong shape (4.weight [50, 20, 5, 5] (model [1024, 1024])" in text
    assert len(text) < 600
    with pytest.raises(CheckpointError, match=r"2 of the wrong shape \(10\.weight \[10, 500\] \(model \[7, 500\]\)"):
        models.load(path, arch="lenet", num_classes=7)
    sd = models.lenet_mnist().state_dict()
    del sd["1.bias"]
    sd["extra"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"1 missing \(1\.bias\); 1 unexpected \(extra\)$"):
        models.load(path, arch="lenet")


def test_bare_body_of_a_normalized_sequential(tmp_path):
    """resnet_cifar is Sequential(Normalize, CifarResNet): the CifarResNet's own state_dict loads into it."""
    model = models.resnet_cifar(20)
    model.train()
    model(torch.rand(4, 3, 32, 32))  # BatchNorm statistics
    sd = model[1].state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # older files lack them
    path = tmp_path / "body.pt"
    torch.save(sd, path)
    loaded = models.load(path, arch="resnet20")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded.eval()(x))
    assert torch.equal(loaded[0].mean, models.Normalize(models.CIFAR10_MEAN, models.CIFAR10_STD).mean)


# -- save() and register() ----------------------------------------------------------------------------------------


def test_save_refuses_other_modules_with_advice(tmp_path):
    with pytest.raises(ValueError) as info:
        models.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), tmp_path / "x.safetensors")
    text = str(info.value)
    for piece in ("engine_arch", "engine.models.register(", "torch.save(model.state_dict(), path)", "load(path, arch=NAME)"):
        assert piece in text
    assert not (tmp_path / "x.safetensors").exists()
    for name in ("lenet", "mlp", "resnet20"):  # every zoo model saves and loads
        model = models.build(name)
        models.save(model, tmp_path / f"{name}.safetensors")
        loaded = models.load(tmp_path / f"{name}.safetensors")
        assert loaded.engine_arch == model.engine_arch and _same_weights(model, loaded)


def _small_net(width: int = 16, num_classes: int = 10):
    return nn.Sequential(models.Normalize(models.MNIST_MEAN, models.MNIST_STD), nn.Flatten(), nn.Linear(784, width),
                         nn.ReLU(), nn.Linear(width, num_classes))


@pytest.fixture
def registered():
    names = []

    def reg(name, constructor, **kw):
        models.register(name, constructor, **kw)
        names.append(name)

    yield reg
    for name in set(names):
        models.unregister(name)


def test_register(tmp_path, registered):
    registered("small_net", _small_net)
    assert "small_net" in models.architectures(torchvision=False)
    model = models.build("small_net", width=8)
    assert model.engine_arch == {"name": "small_net", "kwargs": {"width": 8}}
    path = tmp_path / "s.safetensors"
    models.save(model, path, note="mine")
    loaded = models.load(path)
    assert _same_weights(model, loaded) and loaded[2].out_features == 8
    sd = tmp_path / "s.pt"
    torch.save(model.state_dict(), sd)
    assert _same_weights(model, models.load(sd, arch="small_net", width=8))
    with pytest.raises(CheckpointError, match="wrong shape"):
        models.load(sd, arch="small_net")  # default width 16
    with pytest.raises(ValueError, match="already registered.*replace=True"):
        models.register("small_net", lambda: _small_net(4))
    registered("small_net", lambda width=4: _small_net(width), replace=True)
    assert models.build("small_net")[2].out_features == 4
    for bad in ("lenet", "resnet_cifar", "torchvision.resnet18", "has space", ""):
        with pytest.raises(ValueError):
            models.register(bad, _small_net)
    registered("no_normalize", lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    with pytest.raises(ValueError, match="first layer.*Normalize"):
        models.build("no_normalize")
    registered("not_a_module", lambda: "x")
    with pytest.raises(ValueError, match="not an nn.Module"):
        models.build("not_a_module")
    models.unregister("small_net")
    with pytest.raises(CheckpointError, match="cannot rebuild architecture 'small_net'.*register"):
        models.load(path)
    registered("small_net", _small_net)  # (the fixture removes it again)


# -- torchvision ----------------------------------------------------------------------------------------------------


class _TinyTV(nn.Module):
    """Stands in for a torchvision classifier (conv, BatchNorm, pooling, fc; not sequential)."""

    def __init__(self, num_classes: int = 1000, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3)
        self.bn1 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn1(self.conv1(x)))), 1))


@pytest.fixture
def fake_torchvision(monkeypatch):
    """A stub ``torchvision`` whose models module offers 'tinynet' (classification) through get_model/list_models."""
    calls = []
    tv, tvm = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")

    def list_models(module=None):
        assert module is tvm  # classification models only
        return ["tinynet"]

    def get_model(name, *, weights=None, **kwargs):
        calls.append((name, weights, kwargs))
        assert name == "tinynet"
        return _TinyTV(**kwargs)

    tvm.list_models, tvm.get_model, tv.models = list_models, get_model, tvm
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tvm)
    return calls


def test_torchvision_architectures_through_a_stub(tmp_path, fake_torchvision):
    model = models.build("torchvision.tinynet")
    assert fake_torchvision == [("tinynet", None, {"num_classes": 10})]  # never any weights
    assert isinstance(model[0], models.Normalize) and isinstance(model.net, _TinyTV)
    assert model[0].mean.flatten().tolist() == pytest.approx(models.IMAGENET_MEAN)
    assert model[0].std.flatten().tolist() == pytest.approx(models.IMAGENET_STD)
    x = torch.rand(2, 3, 16, 16)
    assert model.eval()(x).shape == (2, 10)
    assert torch.allclose(model(x), model.net((x - torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1))
                                              / torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)))
    assert "torchvision.tinynet" in models.architectures()
    # engine checkpoint round trip
    path = tmp_path / "tv.safetensors"
    models.save(model, path)
    assert models.read_meta(path)["arch"] == "torchvision.tinynet"
    assert _same_weights(model, models.load(path)) and _same_weights(model, models.load(path, arch="torchvision.tinynet"))
    # the wrapper's own state_dict, and the bare network's as torchvision publishes it (ImageNet: 1000 classes)
    own = tmp_path / "own.pt"
    torch.save(model.state_dict(), own)
    assert _same_weights(model, models.load(own, arch="torchvision.tinynet"))
    published = _TinyTV(num_classes=1000)
    published.train()
    published(torch.rand(4, 3, 8, 8))
    bare = tmp_path / "bare.pt"
    torch.save(published.state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"wrong shape \(net\.fc\.weight \[1000, 16\] \(model \[10, 16\]\)"):
        models.load(bare, arch="torchvision.tinynet")
    loaded = models.load(bare, arch="torchvision.tinynet", num_classes=1000).eval()
    assert torch.equal(loaded.net.bn1.running_mean, published.bn1.running_mean)
    assert torch.equal(loaded(x), published.eval()(loaded[0](x)))
    # nothing is downloaded, unknown names are said so
    with pytest.raises(ValueError, match="never downloads"):
        models.build("torchvision.tinynet", weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="no classification model 'resnet9000'"):
        models.build("torchvision.resnet9000")
    assert all(w is None for _, w, _ in fake_torchvision)


def test_torchvision_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    monkeypatch.delitem(sys.modules, "torchvision.models", raising=False)
    with pytest.raises(ValueError, match=r"needs torchvision.*pip install pacd-engine\[vision\]"):
        models.build("torchvision.resnet18")
    with pytest.raises(SystemExit):
        cli.main(["certify", "--weights", "w.pt", "--arch", "torchvision.resnet18", *CERTIFY, "--out", "x.tsv"])
    assert models.architectures() == models.architectures(torchvision=False)


def test_cli_certify_a_torchvision_state_dict_through_the_stub(tmp_path, fake_torchvision, capsys):
    net = _TinyTV(num_classes=10)  # e.g. fine-tuned elsewhere, saved as the bare torchvision network
    with torch.no_grad():
        net.fc.weight.mul_(30)
    bare = tmp_path / "bare.pt"
    torch.save(net.state_dict(), bare)
    out = tmp_path / "r.tsv"
    args = ["certify", "--weights", str(bare), "--arch", "torchvision.tinynet", *CERTIFY, "--out", str(out)]
    assert cli.main(args) == 2  # a 3-channel (ImageNet-normalised) network on 1-channel MNIST: refused
    assert "is for 3 channels" in capsys.readouterr().err and not out.exists()
    cifar = tmp_path / "cifar"  # a small CIFAR-10 test split in the binary format
    cifar.mkdir()
    rng = np.random.default_rng(0)
    rec = np.concatenate([rng.integers(0, 10, (60, 1)), rng.integers(0, 256, (60, 3072))], axis=1).astype(np.uint8)
    (cifar / "test_batch.bin").write_bytes(rec.tobytes())
    args[args.index("mnist")] = "cifar10"
    assert cli.main(args + ["--data-root", str(cifar)]) == 0
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert settings["arch"] == {"name": "torchvision.tinynet", "kwargs": {"num_classes": 10}}
    assert len(out.read_text().splitlines()) == 1 + 6


def test_real_torchvision(tmp_path):
    try:
        import torchvision
    except Exception as exc:  # not installed, or built for another torch
        pytest.skip(f"torchvision not importable: {exc}")
    model = models.build("torchvision.resnet18")
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    path = tmp_path / "r.safetensors"
    models.save(model, path)
    assert _same_weights(model, models.load(path))
    bare = tmp_path / "bare.pt"
    published = torchvision.models.resnet18(weights=None)
    torch.save(published.state_dict(), bare)
    loaded = models.load(bare, arch="torchvision.resnet18", num_classes=1000)
    assert all(torch.equal(v, loaded.net.state_dict()[k]) for k, v in published.state_dict().items())


# -- command line -------------------------------------------------------------------------------------------------


def test_cli_certify_state_dict_equals_engine_checkpoint(tmp_path):
    model = _lenet()
    sd, ckpt = tmp_path / "sd.pt", tmp_path / "m.safetensors"
    torch.save(model.state_dict(), sd)
    models.save(model, ckpt)
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    proc = _run(["certify", "--arch", "lenet", "--weights", str(sd), *CERTIFY, "--out", str(a)])
    assert proc.returncode == 0, proc.stderr
    proc = _run(["certify", "--checkpoint", str(ckpt), *CERTIFY, "--out", str(b)])
    assert proc.returncode == 0, proc.stderr
    rows = [[r.rsplit("\t", 1)[0] for r in p.read_text().splitlines()] for p in (a, b)]
    assert rows[0] == rows[1] and len(rows[0]) == 7
    assert any(r.split("\t")[2] != "-1" for r in rows[0][1:])  # something certified: the comparison means something
    got, want = (json.loads(p.with_suffix(".json").read_text()) for p in (a, b))
    assert got["acr"] == want["acr"] and got["settings"]["checkpoint_sha256"] != want["settings"]["checkpoint_sha256"]
    assert got["settings"]["arch"] == {"name": "lenet_mnist", "kwargs": {"num_classes": 10}}
    assert "arch" not in want["settings"]


def test_cli_certify_model_options_and_resume_identity(tmp_path, capsys, registered):
    model = _lenet()
    sd, ckpt = tmp_path / "sd.pt", tmp_path / "m.safetensors"
    torch.save(model.state_dict(), sd)
    models.save(model, ckpt)
    out = tmp_path / "r.tsv"

    def certify(*model_args, out=out):
        capsys.readouterr()
        try:
            rc = cli.main(["certify", *model_args, *CERTIFY, "--out", str(out)])
        except SystemExit as exc:  # argparse
            rc = exc.code
        return rc, capsys.readouterr().err

    # exactly one way to give the model
    rc, err = certify()
    assert rc == 2 and "one of the arguments --checkpoint --weights is required" in err
    rc, err = certify("--checkpoint", str(ckpt), "--weights", str(sd))
    assert rc == 2 and "not allowed with" in err
    rc, err = certify("--checkpoint", str(ckpt), "--arch", "lenet")
    assert rc == 2 and "--arch goes with --weights" in err
    rc, err = certify("--checkpoint", str(sd))
    assert rc == 2 and err.startswith("error: ") and "--weights" in err and "--arch NAME" in err
    rc, err = certify("--weights", str(sd))
    assert rc == 2 and "pass arch=NAME (CLI: --arch NAME)" in err
    rc, err = certify("--weights", str(sd), "--arch", "mlp")
    assert rc == 2 and err.count("\n") == 1 and "weights do not match mlp_mnist" in err
    rc, err = certify("--weights", str(sd), "--arch", "nonesuch")
    assert rc == 2 and "argument --arch: unknown architecture 'nonesuch'" in err
    rc, err = certify("--weights", str(ckpt), "--arch", "mlp")
    assert rc == 2 and "engine checkpoint of lenet_mnist" in err
    assert not out.exists()
    # an engine checkpoint through --weights is the same model as through --checkpoint: the run resumes
    assert certify("--checkpoint", str(ckpt))[0] == 0
    assert certify("--weights", str(ckpt))[0] == 0
    assert certify("--weights", str(ckpt), "--arch", "lenet_mnist")[0] == 0
    # a state_dict is identified by its file and the architecture it was read as
    other = tmp_path / "o.tsv"
    assert certify("--weights", str(sd), "--arch", "lenet", out=other)[0] == 0
    assert certify("--weights", str(sd), "--arch", "lenet_mnist", out=other)[0] == 0  # the same architecture
    registered("lenet_alias", models.lenet_mnist)
    rc, err = certify("--weights", str(sd), "--arch", "lenet_alias", out=other)
    assert rc == 2 and "other settings" in err and "arch" in err
    torch.save(_lenet(seed=5).state_dict(), sd)
    rc, err = certify("--weights", str(sd), "--arch", "lenet", out=other)
    assert rc == 2 and "checkpoint_sha256" in err


TRAIN = ["train", "--method", "standard", "--dataset", "mnist", "--sigma", "0", "--train-size", "64", "--batch-size", "32",
         "--lr", "1e-12", "--quiet"]


def test_cli_train_from_weights(tmp_path, capsys, registered):
    start = models.mlp_mnist(hidden=1024)
    sd = tmp_path / "start.pt"
    torch.save({"state_dict": start.state_dict()}, sd)
    out = tmp_path / "m.safetensors"
    assert cli.main([*TRAIN, "--arch", "mlp", "--weights", str(sd), "--epochs", "1", "--out", str(out)]) == 0
    trained = models.load(out)
    for k, v in start.state_dict().items():  # lr 1e-12: still the given weights, not a random initialisation
        assert torch.allclose(trained.state_dict()[k], v, atol=1e-6), k
    assert trained.engine_meta["meta"]["init_weights"] == sha256_file(sd)
    assert trained.engine_meta["meta"]["init_weights_file"] == str(sd)
    scratch = tmp_path / "s.safetensors"
    assert cli.main([*TRAIN, "--arch", "mlp", "--epochs", "1", "--out", str(scratch)]) == 0
    assert not torch.allclose(models.load(scratch)[2].weight, start[2].weight, atol=1e-3)
    assert "init_weights" not in models.load(scratch).engine_meta["meta"]
    # a resume from a run started from other weights is refused
    out2 = tmp_path / "m2.safetensors"
    assert cli.main([*TRAIN, "--arch", "mlp", "--weights", str(sd), "--epochs", "2", "--stop-after-epoch", "1",
                     "--out", str(out2)]) == 0
    capsys.readouterr()
    torch.save(models.mlp_mnist().state_dict(), sd)
    rc = cli.main([*TRAIN, "--arch", "mlp", "--weights", str(sd), "--epochs", "2", "--resume", "--out", str(out2)])
    assert rc == 2 and "init_weights" in capsys.readouterr().err
    # weights of another architecture: one error line
    rc = cli.main([*TRAIN, "--arch", "lenet", "--weights", str(sd), "--epochs", "1", "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "weights do not match lenet_mnist" in err
    # a registered architecture trains and saves by name
    registered("small_net", _small_net)
    reg = tmp_path / "r.safetensors"
    assert cli.main([*TRAIN, "--arch", "small_net", "--epochs", "1", "--out", str(reg)]) == 0
    assert models.load(reg).engine_arch["name"] == "small_net"


def test_evaluate_from_weights(tmp_path, registered, monkeypatch):
    """init_weights starts the victim from the file's weights and is part of the victim's settings."""
    import warnings

    from engine import data
    from engine.evaluate import evaluate_poison

    train_module = sys.modules["engine.train"]
    x, y = data.load_mnist(data.embedded_mnist_root(), "train")
    train, test = (x[:200], y[:200]), (x[200:300], y[200:300])
    registered("small_net", _small_net)
    w1, w2 = tmp_path / "w1.pt", tmp_path / "w2.safetensors"
    start = _small_net()
    torch.save(start.state_dict(), w1)
    models.save(models.build("small_net"), w2)
    common = dict(target_class=3, victim_method="gaussian", arch="small_net", sigma=0.5, epochs=1, lr=1e-12,
                  n_images=2, n0=10, n=20)
    calls = []
    real_train = train_module.train

    def counting_train(*a, **k):
        calls.append(k.get("init_weights"))
        return real_train(*a, **k)

    monkeypatch.setattr(train_module, "train", counting_train)
    first = evaluate_poison(None, train, test, out_dir=tmp_path / "a", init_weights=w1, **common)
    assert calls == [sha256_file(w1)]
    assert first["train_settings"]["init_weights_sha256"] == sha256_file(w1) and first["init_weights"] == str(w1)
    victim = models.load(tmp_path / "a" / "victim.safetensors")
    assert all(torch.allclose(victim.state_dict()[k], v, atol=1e-6) for k, v in start.state_dict().items())
    # reused with the same weights only
    evaluate_poison(None, train, test, out_dir=tmp_path / "b", init_weights=w1, reuse_victims_from=[tmp_path / "a"],
                    **common)
    assert len(calls) == 1
    evaluate_poison(None, train, test, out_dir=tmp_path / "c", init_weights=w2, reuse_victims_from=[tmp_path / "a"],
                    **common)
    assert calls[1:] == [sha256_file(w2)]
    # the victim in out_dir was trained from other weights: set aside, trained again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = evaluate_poison(None, train, test, out_dir=tmp_path / "a", **common)
    assert any("other settings" in str(w.message) for w in caught)
    assert calls[2:] == [None] and "init_weights_sha256" not in again["train_settings"]
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        evaluate_poison(None, train, test, out_dir=tmp_path / "d", init_weights=tmp_path / "none.pt", **common)
    with pytest.raises(CheckpointError, match="weights do not match"):
        evaluate_poison(None, train, test, out_dir=tmp_path / "d", init_weights=w1, **{**common, "arch": "mlp"})


def test_cli_evaluate_weights_flag(tmp_path):
    start = models.mlp_mnist()
    w = tmp_path / "w.pt"
    torch.save(start.state_dict(), w)
    ev = ["evaluate", "--clean", "--target-class", "8", "--val-size", "9500", "--victim-method", "gaussian", "--arch", "mlp",
          "--sigma", "0.5", "--epochs", "1", "--lr", "1e-12", "--images", "2", "--n0", "10", "--n", "20", "--quiet"]
    proc = _run([*ev, "--weights", str(w), "--out-dir", str(tmp_path / "ev")])
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["train_settings"]["init_weights_sha256"] == sha256_file(w)
    victim = models.load(tmp_path / "ev" / "victim.safetensors")
    assert torch.allclose(victim[2].weight, start[2].weight, atol=1e-6)
    proc = _run([*ev, "--weights", str(tmp_path / "nope.pt"), "--out-dir", str(tmp_path / "ev2")])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "no such checkpoint" in proc.stderr
