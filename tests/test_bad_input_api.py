"""Bad inputs to the Python API (certify, train, poison, evaluate_poison) and its progress bars.

Every bad input is refused once, before any work, with an :class:`engine.validate.InputError` (a ValueError) whose
one-line message names the input and says what was found.
"""

import io
import math
import re
import sys

import pytest
import torch
from torch import nn

import engine
from engine import data, models
from engine.validate import InputError, check_dataset, check_images, check_labels, check_model_fits

SMALL_POISON = dict(sigma=0.5, eps=0.1, outer_steps=0, batch_clean=4, batch_poison=2, batch_val=2, k=2, niter1=1,
                    niter2=1, reset_every=0)


def _mnist(n=8, channels=1, size=28):
    """Random uint8 images with pixels 0 and 255 present, and labels 0..9 with 3 among them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0, 255
    y = torch.arange(n) % 10
    y[1] = 3
    return x, y


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


class _Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, info):
        self.calls += 1


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# -- train --------------------------------------------------------------------------------------
def _float255(x, y):
    return (x.float(), y), {}


def _nan(x, y):
    xf = x.float() / 255
    xf[2, 0, 5, 5] = math.nan
    return (xf, y), {}


def _float_labels(x, y):
    return (x, y.float()), {}


def _labels_out_of_range(x, y):
    y = y.clone()
    y[4] = 11
    return (x, y), {}


def _eval_length(x, y):
    return (x, y), {"eval_data": (x, y[:5])}


def _eval_range(x, y):
    ye = y.clone()
    ye[0] = 12
    return (x, y), {"eval_data": (x, ye)}


def _negative_labels(x, y):
    y = y.clone()
    y[0] = -1
    return (x, y), {}


@pytest.mark.parametrize(
    "make,match",
    [
        (_float255, r"train_data images: float pixels must lie in \[0, 1\], got range \[0, 255\]: divide by 255 or pass uint8"),
        (_nan, r"train_data images: 1 of 6272 pixel values are NaN or infinite"),
        (_float_labels, r"train_data labels must be integers .*got torch.float32"),
        (_negative_labels, r"train_data labels must be >= 0"),
        (_labels_out_of_range, r"train_data labels go up to 11 but the model has 10 outputs"),
        (_eval_length, r"eval_data labels must be a 1-D tensor of 8 labels \(one per image\), got shape \(5,\)"),
        (_eval_range, r"eval_data labels go up to 12 but the model has 10 outputs"),
    ],
    ids=["float-0-255", "nan", "float-labels", "negative-labels", "labels-beyond-outputs", "eval-length", "eval-range"],
)
def test_train_refuses_bad_data_before_the_first_step(make, match, tmp_path):
    train_data, extra = make(*_mnist())
    seen = _Counter()
    ckpt = tmp_path / "ckpt.safetensors"
    with pytest.raises(InputError, match=match) as exc:
        engine.train(_mlp(), train_data, epochs=1, batch_size=4, progress=seen, checkpoint=ckpt, **extra)
    _one_line(exc)
    assert seen.calls == 0 and not ckpt.exists()


@pytest.mark.parametrize(
    "build,shape,match",
    [
        # the CIFAR ResNet's 3-channel normalisation would broadcast MNIST's one channel and train silently
        (lambda: models.build("resnet20"), (1, 28, 28), r"is for 3 channels, the images have 1"),
        (lambda: models.build("lenet"), (3, 32, 32), r"it failed with: .*expected input\[1, 3, 32, 32\] to have 1 channels"),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)), (1, 28, 28),
         r"it failed with: .*to have 3 channels"),
    ],
    ids=["resnet20-on-mnist", "lenet-on-cifar", "conv3-on-mnist"],
)
def test_train_refuses_a_model_that_does_not_fit_the_images(build, shape, match, tmp_path):
    x, y = _mnist(4, *shape[:2])
    seen = _Counter()
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=re.escape(f"model does not accept images of shape {shape}: ")) as exc:
        engine.train(model, (x, y), epochs=1, batch_size=2, progress=seen, checkpoint=tmp_path / "c.safetensors")
    assert re.search(match, _one_line(exc))
    assert seen.calls == 0 and not (tmp_path / "c.safetensors").exists()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# -- certify / predict --------------------------------------------------------------------------
@pytest.mark.parametrize("fn", ["certify", "predict"])
def test_certify_refuses_a_cifar_resnet_on_mnist_images(fn):
    x = torch.rand(2, 1, 28, 28)
    kwargs = {"n0": 5} if fn == "certify" else {}
    with pytest.raises(InputError, match=r"model does not accept images of shape \(1, 28, 28\)") as exc:
        getattr(engine, fn)(models.build("resnet20"), x, sigma=0.25, n=10, **kwargs)
    _one_line(exc)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(InputError, match=r"it failed with: .*to have 3 channels, but got 1 channels") as exc:
        getattr(engine, fn)(conv, x, sigma=0.25, n=10, **kwargs)
    _one_line(exc)


# -- poison -------------------------------------------------------------------------------------
def test_poison_refuses_a_module_instead_of_a_factory():
    data = _mnist()
    with pytest.raises(InputError, match=r"poison takes a model factory \(e.g. lambda: engine.models.build\('lenet'\)\), "
                                         r"got a lenet_mnist module"):
        engine.poison(models.build("lenet"), data, data, target_class=3, **SMALL_POISON)
    with pytest.raises(TypeError, match="model factory"):  # an InputError that is also a TypeError
        engine.poison("lenet", data, data, target_class=3, **SMALL_POISON)


@pytest.mark.parametrize(
    "factory,target,data,match",
    [
        (lambda: models.build("lenet"), 10, None, r"target_class 10 is not a class of the model from model_fn "
                                                  r"\(lenet_mnist\): it has 10 outputs"),
        (lambda: models.build("lenet", num_classes=3), 1, None, r"train_data labels go up to 7 but the model from model_fn "
                                                                r"\(lenet_mnist\) has 3 outputs"),
        (lambda: models.build("resnet20"), 3, None, r"model from model_fn \(resnet_cifar\) does not accept images of shape"),
        (lambda: models.build("lenet"), 3, "float255", r"train_data images: float pixels must lie in \[0, 1\]"),
        (lambda: models.build("lenet"), -1, None, r"target_class must be >= 0"),
    ],
    ids=["target-beyond-outputs", "labels-beyond-outputs", "resnet20-on-mnist", "float-0-255", "negative-target"],
)
def test_poison_refuses_inputs_that_do_not_fit(factory, target, data, match):
    x, y = _mnist()
    if data == "float255":
        x = x.float()
    with pytest.raises(InputError, match=match) as exc:
        engine.poison(factory, (x, y), _mnist(), target_class=target, **SMALL_POISON)
    _one_line(exc)


# -- evaluate_poison ----------------------------------------------------------------------------
def test_evaluate_poison_refuses_a_victim_architecture_that_does_not_fit(tmp_path):
    data = _mnist()
    with pytest.raises(InputError, match=r"victim architecture 'resnet20' does not accept images of shape \(1, 28, 28\)"):
        engine.evaluate_poison(None, data, data, victim_method="standard", arch="resnet20", sigma=0.25, target_class=3,
                               epochs=1, n_images=1, n0=5, n=10, out_dir=tmp_path / "ev")
    assert not (tmp_path / "ev").exists()  # refused before anything is trained, certified or written
    with pytest.raises(InputError, match=r"target_class 10 is not a class of the victim architecture 'mlp'"):
        engine.evaluate_poison(None, data, data, victim_method="standard", arch="mlp", sigma=0.25, target_class=10,
                               epochs=1, n_images=1, n0=5, n=10, out_dir=tmp_path / "ev")
    with pytest.raises(InputError, match=r"test_data images must be uint8"):
        engine.evaluate_poison(None, data, (data[0].float() / 255, data[1]), victim_method="standard", arch="mlp",
                               sigma=0.25, target_class=3, epochs=1, n_images=1, n0=5, n=10, out_dir=tmp_path / "ev")


# -- the checks themselves ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "x,kwargs,error,match",
    [
        (torch.zeros(2, 28, 28), {}, InputError, r"images must have shape \(N, C, H, W\), got \(2, 28, 28\)"),
        (torch.zeros(2, 1, 4, 4).numpy(), {}, TypeError, r"torch.from_numpy"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.int64), {}, TypeError, r"uint8 \(0..255\) or floating"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), {"allow_uint8": False}, TypeError, r"engine.data.to_float"),
        (torch.full((2, 1, 4, 4), math.inf), {}, InputError, r"32 of 32 pixel values are NaN or infinite"),
        (torch.full((2, 1, 4, 4), -0.5), {}, InputError, r"got range \[-0.5, -0.5\]$"),
    ],
)
def test_check_images(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_images(x, **kwargs)


def test_check_images_labels_and_dataset_accept_good_inputs():
    x, y = _mnist(4)
    assert check_images(x) is x and check_images(x.float() / 255) is not None
    assert check_labels([0, 1, 2], 3).dtype == torch.int64
    with pytest.raises(TypeError, match="integers"):
        check_labels(torch.tensor([True, False]), 2)
    with pytest.raises(InputError, match=r"labels go up to 9 but there are 5 classes"):
        check_labels(torch.tensor([9, 0, 1, 2]), 4, num_classes=5)
    with pytest.raises(InputError, match=r"labels must be a 1-D tensor of 4 labels"):
        check_labels(torch.zeros(2, 2, dtype=torch.int64), 4)
    images, labels = check_dataset((x, y.to(torch.int32)), "data")
    assert images is x and labels.dtype == torch.int64
    with pytest.raises(InputError, match=r"data must be a pair"):
        check_dataset(x, "data")
    with pytest.raises(InputError, match=r"data is empty"):
        check_dataset((x[:0], y[:0]), "data")


def test_check_model_fits_restores_the_mode_and_counts_outputs():
    model = _mlp().train()
    x, y = _mnist(4)
    assert check_model_fits(model, x, labels=y) == 10 and model.training
    assert check_model_fits(model.eval(), x[:0]) == 10 and not model.training
    with pytest.raises(InputError, match=r"model has 10 outputs but 5 classes are expected"):
        check_model_fits(model, x, num_classes=5)
    with pytest.raises(InputError, match=r"model output must be logits of shape \(1, num_classes\)"):
        check_model_fits(nn.Flatten(0), x)


# -- progress -----------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _run_all(progress=None, **extra):
    kw = {} if progress == "default" else {"progress": progress}
    x, y = _mnist(8)
    engine.certify(_mlp(), x[:1].float() / 255, sigma=0.25, n0=5, n=10, **kw)
    engine.train(_mlp(), (x, y), epochs=1, batch_size=4, **kw)
    engine.poison(_mlp, (x, y), (x, y), target_class=3, **SMALL_POISON, **kw)


def test_default_progress_prints_nothing_under_pytest(capsys):
    _run_all("default")
    assert capsys.readouterr().err == ""
    _run_all(False)
    assert capsys.readouterr().err == ""


def test_default_progress_draws_on_a_terminal(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _run_all("default")
    out = terminal.getvalue()
    assert "certify" in out and "epoch 1/1" in out and "loss=" in out and "poison[gaussian]" in out
    terminal.seek(0)
    terminal.truncate()
    _run_all(False)
    assert terminal.getvalue() == ""


def test_progress_true_draws_bars(capsys):
    _run_all(True)
    err = capsys.readouterr().err
    assert "certify" in err and "epoch 1/1" in err and "acc=" in err and "poison[gaussian]" in err
    with pytest.raises(TypeError, match="progress must be"):
        engine.train(_mlp(), _mnist(4), epochs=1, progress="yes")


def test_devices_types_and_paths_are_checked_first(tmp_path):
    """CUDA where there is none, a malformed device, a poison file's path where a PoisonSet goes, a file where a folder
    goes, a folder where a checkpoint goes, the triton backend on the CPU, eps beyond the pixel range: InputError."""
    from engine import models as models_module
    from engine.evaluate import evaluate_poison
    from engine.models import CheckpointError
    from engine.validate import InputError

    x, y = data.load_mnist(data.embedded_mnist_root(), "train")
    small = (x[:64], y[:64])
    model = models_module.lenet_mnist()
    path = tmp_path / "m.safetensors"
    models_module.save(model, path)
    with pytest.raises(InputError, match="not a device"):
        models_module.load(path, device="gpu")
    with pytest.raises(CheckpointError, match="is a directory"):
        models_module.load(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            engine.poison(lambda: models_module.lenet_mnist(), small, small, target_class=1, device="cuda", **SMALL_POISON)
    for eps in (0.0, 2.0):
        with pytest.raises(InputError, match="eps"):
            engine.poison(lambda: models_module.lenet_mnist(), small, small, target_class=1,
                          **{**SMALL_POISON, "eps": eps})
    with pytest.raises(InputError, match="must be a PoisonSet"):
        evaluate_poison("p.safetensors", small, small, victim_method="gaussian", sigma=0.5, out_dir=tmp_path / "e")
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        evaluate_poison(None, small, small, victim_method="gaussian", sigma=0.5, target_class=1, out_dir=a_file)
    with pytest.raises(InputError, match="is a directory"):
        engine.train(model, small, method="gaussian", sigma=0.5, epochs=1, checkpoint=tmp_path)
    if not torch.cuda.is_available():
        import os

        old = os.environ.pop("TRITON_INTERPRET", None)
        try:
            with pytest.raises(InputError, match="backend 'triton' needs a CUDA model"):
                engine.certify(model, data.to_float(x[:1]), sigma=0.5, n0=5, n=10, backend="triton")
        finally:
            if old is not None:
                os.environ["TRITON_INTERPRET"] = old
