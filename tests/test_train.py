"""Training: each procedure learns, noise is fresh, exact resume, argument errors, the train command."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import engine
from engine import data, models
from engine.models import CheckpointError
from engine.train import METHODS, evaluate, read_checkpoint_meta, split_validation

METHOD_SETTINGS = {
    "standard": {},
    "gaussian": {},
    "smoothadv": {"eps": 0.5, "steps": 2, "m": 2, "warmup": 2},
    "macer": {"k": 4, "lbd": 2.0},
}


@pytest.fixture(scope="module")
def mnist():
    root = data.embedded_mnist_root()
    return data.load_mnist(root, "train"), data.load_mnist(root, "test")


def _tiny(batchnorm=False):
    layers = [models.Normalize(models.MNIST_MEAN, models.MNIST_STD), nn.Flatten(), nn.Linear(784, 48)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(48))
    layers += [nn.ReLU(), nn.Linear(48, 10)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("method", METHODS)
def test_each_procedure_improves_noisy_accuracy(mnist, method):
    (x, y), (xt, yt) = mnist
    sigma = 0.5
    torch.manual_seed(0)
    model = _tiny()
    test = (xt[:1000], yt[:1000])
    before = evaluate(model, test, sigma=sigma)["eval_noisy_accuracy"]
    _, history = engine.train(
        model,
        (x[:1000], y[:1000]),
        method=method,
        sigma=sigma,
        epochs=3,
        batch_size=50,
        lr=0.05,
        seed=1,
        **METHOD_SETTINGS[method],
    )
    after = evaluate(model, test, sigma=sigma)["eval_noisy_accuracy"]
    # one noise draw on 1000 images: standard error about 0.016; untrained about 0.1, trained 0.5 to 0.8
    assert after >= 0.45 and after >= before + 0.3, (method, before, after)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert not model.training


class _Recorder(nn.Module):
    """Linear model that keeps a copy of every input batch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)
        self.seen = []

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("method,kw", [("gaussian", {}), ("macer", {"k": 3})])
def test_fresh_noise_every_batch_and_epoch(method, kw):
    model = _Recorder()
    zeros = torch.zeros(8, 1, 4, 4)  # the model then sees the noise itself
    engine.train(model, (zeros, torch.arange(8) % 3), method=method, sigma=0.5, epochs=2, batch_size=4, seed=3, **kw)
    seen = torch.cat([s.flatten(1) for s in model.seen])  # (2 epochs * 2 batches * copies, 16)
    assert len(model.seen) == 4 and seen.shape[0] == 4 * 4 * kw.get("k", 1)
    assert abs(float(seen.std()) - 0.5) < 0.05  # sigma-scaled standard normal draws (256 * k values)
    assert torch.unique(seen, dim=0).shape[0] == seen.shape[0]  # no draw repeats across copies, batches, epochs
    # and a fixed seed gives the same draws
    model2 = _Recorder()
    engine.train(model2, (zeros, torch.arange(8) % 3), method=method, sigma=0.5, epochs=2, batch_size=4, seed=3, **kw)
    assert all(torch.equal(a, b) for a, b in zip(model.seen, model2.seen))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class _Crash(Exception):
    pass


def _reference_run(data_, common, torch_seed):
    """(initial weights, trained model, history) of an uninterrupted run of the batch-norm tiny net."""
    torch.manual_seed(torch_seed)
    init = _state(_tiny(batchnorm=True))
    ref = _tiny(batchnorm=True)
    ref.load_state_dict(init)
    _, ref_hist = engine.train(ref, data_, **common)
    return init, ref, ref_hist


def _assert_same_run(model, hist, ref, ref_hist):
    """Bit-identical weights and the same history apart from wall-clock seconds."""
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in hist]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in ref_hist]


@pytest.mark.parametrize(
    "method,optimizer,schedule,kw",
    [
        ("gaussian", "sgd", "cosine", {}),
        ("smoothadv", "adam", "step", {"eps": 0.5, "steps": 2, "m": 2, "warmup": 2}),
        ("macer", "sgd", "step", {"k": 2, "lbd": 2.0}),
    ],
)
def test_resume_gives_identical_weights(tmp_path, mnist, method, optimizer, schedule, kw):
    (x, y), _ = mnist
    data_ = (x[:192], y[:192])
    common = dict(
        method=method, sigma=0.25, epochs=3, batch_size=50, lr=0.02, optimizer=optimizer, schedule=schedule, seed=5, **kw
    )
    init, ref, ref_hist = _reference_run(data_, common, 1)

    ckpt = tmp_path / "run.ckpt.safetensors"
    model = _tiny(batchnorm=True)
    model.load_state_dict(init)
    _, hist = engine.train(model, data_, checkpoint=ckpt, stop_after_epoch=1, **common)  # planned stop
    assert len(hist) == 1 and read_checkpoint_meta(ckpt)["epoch"] == 1

    def crash_after_epoch_2(entry):
        if entry["epoch"] == 2:
            raise _Crash  # a crash right after the epoch-2 checkpoint was written

    model = _tiny(batchnorm=True)  # a fresh process: new model, weights from the checkpoint
    with pytest.raises(_Crash):
        engine.train(model, data_, checkpoint=ckpt, resume=True, log=crash_after_epoch_2, **common)
    meta = read_checkpoint_meta(ckpt)
    assert meta["epoch"] == 2 and len(meta["history"]) == 2
    # optimizer state is stored as tensors (no pickle): momentum buffers or Adam moments
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as fh:
        keys = set(fh.keys())
    wanted = "exp_avg_sq" if optimizer == "adam" else "momentum_buffer"
    assert any(k.startswith("optimizer.state.") and k.endswith(wanted) for k in keys)

    model = _tiny(batchnorm=True)
    _, hist = engine.train(model, data_, checkpoint=ckpt, resume=True, **common)
    _assert_same_run(model, hist, ref, ref_hist)
    if method == "smoothadv":
        assert [h["eps"] for h in hist] == [0.25, 0.5, 0.5]  # linear warm-up over 2 epochs

    # resuming a finished run changes nothing; resuming with other settings is refused
    again = _tiny(batchnorm=True)
    _, hist2 = engine.train(again, data_, checkpoint=ckpt, resume=True, **common)
    assert hist2 == hist and all(torch.equal(v, again.state_dict()[k]) for k, v in ref.state_dict().items())
    with pytest.raises(CheckpointError, match="lr"):
        engine.train(_tiny(batchnorm=True), data_, checkpoint=ckpt, resume=True, **{**common, "lr": 0.03})
    with pytest.raises(CheckpointError, match="train_sha256"):
        engine.train(_tiny(batchnorm=True), (x[1:193], y[1:193]), checkpoint=ckpt, resume=True, **common)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "mixup"}, "method must be one of"),
        ({"sigma": -0.25}, "sigma"),
        ({"sigma": 0.0}, "sigma"),
        ({"method": "smoothadv", "eps": -0.5}, "eps"),
        ({"method": "smoothadv"}, "needs the argument eps"),
        ({"method": "smoothadv", "eps": 0.5, "steps": 0}, "steps"),
        ({"method": "smoothadv", "eps": 0.5, "m": 0}, "m must"),
        ({"method": "smoothadv", "eps": 0.5, "warmup": 0}, "warmup"),
        ({"method": "macer", "k": 0}, "k must"),
        ({"method": "macer", "lbd": -1.0}, "lbd"),
        ({"method": "macer", "lbd_warmup": -1}, "lbd_warmup must"),
        ({"method": "macer", "lbd_warmup": 1.5}, "lbd_warmup must"),
        ({"method": "gaussian", "eps": 0.5}, "takes no argument"),
        ({"method": "macer", "kk": 4}, "kk"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"schedule": "linear"}, "schedule"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"resume": True}, "checkpoint"),
    ],
)
def test_bad_arguments(kwargs, match):
    images, labels = torch.zeros(4, 1, 4, 4), torch.zeros(4, dtype=torch.int64)
    kwargs = {"method": "gaussian", "sigma": 0.25, "epochs": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        engine.train(_Recorder(), (images, labels), **kwargs)


def test_bad_data():
    with pytest.raises(ValueError, match="train_data"):
        engine.train(_Recorder(), torch.zeros(4, 1, 4, 4), sigma=0.25)
    with pytest.raises(ValueError, match="labels"):
        engine.train(_Recorder(), (torch.zeros(4, 1, 4, 4), torch.zeros(3, dtype=torch.int64)), sigma=0.25)


def test_split_validation():
    images, labels = torch.arange(100).view(100, 1, 1, 1), torch.arange(100)
    (tx, ty), (vx, vy) = split_validation(images, labels, 10, 50)
    assert tx.shape[0] == 50 and vx.shape[0] == 10 and torch.equal(tx.flatten(), ty) and torch.equal(vx.flatten(), vy)
    assert not set(ty.tolist()) & set(vy.tolist())
    (tx2, _), (vx2, _) = split_validation(images, labels, 10, 50)
    assert torch.equal(tx, tx2) and torch.equal(vx, vx2)
    assert split_validation(images, labels)[0][0] is images and split_validation(images, labels)[1] is None
    with pytest.raises(ValueError, match="exceed"):
        split_validation(images, labels, 60, 50)


# -- command line ---------------------------------------------------------------------------------
def _run(args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env)


def _train_args(out, *extra):
    return [
        "train", "--method", "smoothadv", "--dataset", "mnist", "--arch", "mlp", "--sigma", "0.5", "--epochs", "2",
        "--batch-size", "64", "--lr", "0.05", "--attack-eps", "0.5", "--steps", "1", "--warmup", "2", "--train-size", "256",
        "--val-size", "128", "--seed", "2", "--out", str(out), *extra,
    ]  # fmt: skip


def test_cli_train_end_to_end_with_resume(tmp_path):
    full = tmp_path / "full" / "model.safetensors"
    proc = _run(_train_args(full))
    assert proc.returncode == 0, proc.stderr
    assert "epoch 2:" in proc.stdout and "noisy val acc" in proc.stdout
    assert "img/s" in proc.stderr and "loss=" in proc.stderr and "acc=" in proc.stderr  # progress bar
    meta = models.read_meta(full)["meta"]
    assert meta["method"] == "smoothadv" and meta["method_args"] == {"eps": 0.5, "steps": 1, "warmup": 2}
    assert len(meta["history"]) == 2 and meta["train_size"] == 256 and meta["train_seconds"] > 0
    assert (tmp_path / "full" / "model.checkpoint.safetensors").exists()

    part = tmp_path / "part" / "model.safetensors"
    proc = _run(_train_args(part, "--stop-after-epoch", "1", "--checkpoint-minutes", "0.0001"))  # mid-epoch ones too
    assert proc.returncode == 0, proc.stderr
    assert "continue with --resume" in proc.stdout and not part.exists()
    proc = _run(_train_args(part))  # neither --resume nor --overwrite: refused, nothing lost
    assert proc.returncode == 2 and "--resume" in proc.stderr
    proc = _run(_train_args(part, "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1:" not in proc.stdout and "epoch 2:" in proc.stdout
    a, b = models.load(full), models.load(part)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert json.dumps(models.read_meta(part)["meta"]["history"][0]["loss"]) == json.dumps(meta["history"][0]["loss"])

    proc = _run(_train_args(part, "--resume", "--lr", "0.1"))  # other settings: refused
    assert proc.returncode == 2 and "lr" in proc.stderr
    proc = _run(_train_args(tmp_path / "x.safetensors", "--k", "4"))  # a MACER argument for SmoothAdv
    assert proc.returncode == 2 and "takes no argument" in proc.stderr
    proc = _run(_train_args(tmp_path / "y.safetensors", "--checkpoint-minutes", "-1"))
    assert proc.returncode == 2 and "--checkpoint-minutes" in proc.stderr


@pytest.mark.parametrize("method,kw", [("gaussian", {}), ("smoothadv", {"eps": 0.5, "steps": 2, "m": 2, "warmup": 2})])
def test_resume_inside_an_epoch_gives_identical_weights(tmp_path, mnist, method, kw):
    (x, y), _ = mnist
    data_ = (x[:230], y[:230])  # 5 batches of 50 per epoch, the last one short
    common = dict(method=method, sigma=0.25, epochs=2, batch_size=50, lr=0.02, seed=3, **kw)
    init, ref, ref_hist = _reference_run(data_, common, 2)

    ckpt = tmp_path / "run.ckpt.safetensors"
    for epoch, batch in [(1, 3), (2, 1), (2, 4)]:  # crash inside epoch 1, then twice inside epoch 2

        def crash(p, epoch=epoch, batch=batch):
            if p["epoch"] == epoch and p["batch"] == batch:
                raise _Crash

        model = _tiny(batchnorm=True)
        model.load_state_dict(init)
        with pytest.raises(_Crash):
            engine.train(model, data_, checkpoint=ckpt, resume=True, checkpoint_seconds=0, progress=crash, **common)
        meta = read_checkpoint_meta(ckpt)
        assert meta["epoch"] == epoch - 1 and meta["partial_epoch"]["batches_done"] == batch
    model = _tiny(batchnorm=True)  # a planned stop at a finished epoch first finishes the interrupted one
    _, hist = engine.train(model, data_, checkpoint=ckpt, resume=True, stop_after_epoch=1, **common)
    assert len(hist) == 2 and "partial_epoch" not in read_checkpoint_meta(ckpt)
    model = _tiny(batchnorm=True)
    _, hist = engine.train(model, data_, checkpoint=ckpt, resume=True, checkpoint_seconds=0, **common)
    _assert_same_run(model, hist, ref, ref_hist)
    assert "partial_epoch" not in read_checkpoint_meta(ckpt)  # the final checkpoint is an epoch checkpoint
    with pytest.raises(ValueError, match="checkpoint_seconds"):
        engine.train(_tiny(), data_, checkpoint_seconds=1.0, **common)
    with pytest.raises(ValueError, match="checkpoint_seconds"):
        engine.train(_tiny(), data_, checkpoint=ckpt, checkpoint_seconds=-1.0, **common)


def test_channels_last_training_matches_standard_layout(mnist):
    (x, y), _ = mnist
    data_ = (x[:128], y[:128])
    common = dict(method="gaussian", sigma=0.25, epochs=1, batch_size=32, lr=0.05, seed=4)
    torch.manual_seed(6)
    init = _state(engine.models.lenet_mnist())
    runs = {}
    for cl in (False, True):
        model = engine.models.lenet_mnist()
        model.load_state_dict(init)
        ids = [id(p) for p in model.parameters()]
        _, hist = engine.train(model, data_, channels_last=cl, **common)
        assert [id(p) for p in model.parameters()] == ids  # same parameter objects
        assert all(p.is_contiguous() for p in model.parameters())  # handed back in the standard layout
        runs[cl] = (model.state_dict(), hist)
    moved = 0.0
    for k, v in runs[False][0].items():
        torch.testing.assert_close(runs[True][0][k], v, rtol=1e-4, atol=1e-5)  # float rounding only
        moved = max(moved, float((v - init[k]).abs().max()))
    assert moved > 1e-3  # the weights did train
    assert abs(runs[True][1][0]["loss"] - runs[False][1][0]["loss"]) < 1e-4


def test_macer_lbd_warmup(mnist):
    """lbd_warmup: epoch 0 trains the classification term alone (same weights as lbd 0), then lbd grows."""
    (images, labels), _ = mnist
    data_ = (images[:256], labels[:256])

    def run(epochs, **kw):
        torch.manual_seed(0)
        model = _tiny()
        _, hist = engine.train(model, data_, method="macer", sigma=0.5, epochs=epochs, batch_size=64, lr=0.05, seed=1, k=2,
                               **kw)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), hist

    w_warm, hist = run(1, lbd=3.0, lbd_warmup=2)
    w_zero, _ = run(1, lbd=0.0)
    w_full, hist_full = run(1, lbd=3.0)
    assert torch.equal(w_warm, w_zero) and not torch.equal(w_warm, w_full)
    assert hist[0]["lbd"] == 0.0 and hist_full[0]["lbd"] == 3.0
    _, hist = run(4, lbd=3.0, lbd_warmup=2)
    assert [h["lbd"] for h in hist] == [0.0, 1.5, 3.0, 3.0]
