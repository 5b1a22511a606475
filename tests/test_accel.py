"""Engine integration of the kernels: backends, precisions, batch-size invariance, model surgery.

The "triton" backend runs here under the Triton interpreter (tests/conftest.py). Equal counts
across backends are demanded in fp32 after a float64 check that no test sample is a near-tie
(tests/fp_margins.py); the checks are deterministic, so the tests cannot pass or fail by chance.
"""

import pytest
import torch
from kernel_testing import MIN_GAP, assert_no_near_ties, float64_logits, gpu, packed_noisy_rows, top2_gap
from torch import nn

import engine
from engine import accel, models, noise


def _spread(model, factor=20.0):
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(factor)  # several classes occur under noise
    return model.eval()


def _random_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _mlp():
    torch.manual_seed(0)
    return _spread(models.mlp_mnist(hidden=40))


def _lenet():
    torch.manual_seed(1)
    return _spread(models.lenet_mnist())


def _resnet():
    torch.manual_seed(2)
    return _spread(_random_bn(models.resnet_cifar(8)), 5.0)


class _NoLinearEnd(nn.Module):
    """A conv net whose logits come from a pooling (no last linear layer to fuse)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return 10 * self.pool(torch.tanh(self.conv(x))).flatten(1)


def _nolinear():
    torch.manual_seed(3)
    return _NoLinearEnd().eval()


MODELS = {
    "mlp": (_mlp, (1, 28, 28), "mlp"),
    "lenet": (_lenet, (1, 28, 28), "conv_pool"),
    "resnet8": (_resnet, (3, 32, 32), "generic"),
    "nolinear": (_nolinear, (3, 9, 11), "generic"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_triton_backend_equals_torch_backend(name, monkeypatch):
    monkeypatch.setenv("ENGINE_FORWARD_ROWS", "48")  # several forward batches, crossing image boundaries
    build, shape, kind = MODELS[name]
    model = build()
    x = torch.rand((2,) + shape)
    ids = torch.tensor([4, 2**32 - 1])
    n0, n, seed, sigma = 10, 60, 7, 0.5
    assert_no_near_ties(model, x, ids, {noise.STREAM_SELECTION: n0, noise.STREAM_ESTIMATION: n}, seed=seed, sigma=sigma)
    kw = dict(sigma=sigma, n0=n0, n=n, alpha=0.01, seed=seed, image_ids=ids, precision="fp32")
    ref = engine.certify(model, x, backend="torch", **kw)
    got = engine.certify(model, x, backend="triton", **kw)
    sampler = accel._CACHE[-1][3]
    assert sampler.kind == kind
    if kind != "mlp":
        assert (sampler.linear is not None) == (name != "nolinear")  # last linear fused with the counting
    assert torch.equal(got.counts_selection, ref.counts_selection)
    assert torch.equal(got.counts_estimation, ref.counts_estimation)
    assert torch.equal(got.prediction, ref.prediction) and torch.equal(got.radius, ref.radius)
    assert int((ref.counts_estimation > 0).sum(1).max()) >= 2, "model too confident for a meaningful test"


def test_counts_identical_for_any_batch_size_and_forward_rows(monkeypatch):
    model = _lenet()
    x = torch.rand(3, 1, 28, 28)
    ids = torch.arange(3)
    # the CPU run sums in other orders
    assert_no_near_ties(model, x, ids, {noise.STREAM_SELECTION: 10, noise.STREAM_ESTIMATION: 40}, seed=5, sigma=0.5)
    runs = []
    for rows, batch_size in (("32", 7), ("100", 1000), ("256", None)):
        monkeypatch.setenv("ENGINE_FORWARD_ROWS", rows)
        runs.append(engine.certify(model, x, sigma=0.5, n0=10, n=40, seed=5, batch_size=batch_size, backend="triton",
                                   precision="fp32"))
    for r in runs[1:]:
        assert torch.equal(r.counts_selection, runs[0].counts_selection)
        assert torch.equal(r.counts_estimation, runs[0].counts_estimation)
    cpu = engine.certify(model, x, sigma=0.5, n0=10, n=40, seed=5, batch_size=13, backend="auto")
    assert torch.equal(cpu.counts_estimation, runs[0].counts_estimation)


def test_predict_triton_equals_torch(monkeypatch):
    monkeypatch.setenv("ENGINE_FORWARD_ROWS", "128")
    model = _mlp()
    x = torch.rand(3, 1, 28, 28)
    # the kernel sums in its own order
    assert_no_near_ties(model, x, torch.arange(3), {noise.STREAM_PREDICT: 100}, seed=3, sigma=0.5)
    kw = dict(sigma=0.5, n=100, alpha=0.05, seed=3, precision="fp32")
    assert torch.equal(engine.predict(model, x, backend="triton", **kw), engine.predict(model, x, backend="torch", **kw))


def test_bf16_stays_close_to_fp32(monkeypatch):
    # bf16 changes the base classifier slightly: counts move by the few samples whose decision the
    # rounding flips (bench/experiments/mixed_precision/results/mixed_precision-*.md quantifies it on a trained model)
    monkeypatch.setenv("ENGINE_FORWARD_ROWS", "128")
    model = _resnet()
    x = torch.rand(2, 3, 32, 32)
    kw = dict(sigma=0.25, n0=10, n=100, seed=1)
    fp32 = engine.certify(model, x, backend="torch", precision="fp32", **kw)
    for backend in ("auto", "triton"):
        bf16 = engine.certify(model, x, backend=backend, precision="bf16", **kw)
        assert int((bf16.counts_estimation - fp32.counts_estimation).abs().sum()) <= 10


def test_fold_batchnorm_and_split_last_linear():
    model = _resnet()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        folded = accel.fold_batchnorm(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-4)
        body, lin = accel.split_last_linear(model)
        assert lin.out_features == 10
        torch.testing.assert_close(lin(body(x)), want, rtol=1e-5, atol=1e-5)
        body, lin = accel.split_last_linear(_lenet())
        assert isinstance(body, nn.Sequential) and lin.in_features == 500
    assert accel.split_last_linear(_nolinear()) is None
    assert accel.split_last_linear(nn.Sequential(nn.Flatten(), nn.ReLU())) is None
    untraceable = _nolinear()
    assert isinstance(accel.fold_batchnorm(untraceable), nn.Module)


def test_sampler_cache_follows_weight_changes(monkeypatch):
    monkeypatch.setenv("ENGINE_FORWARD_ROWS", "64")
    accel.clear_cache()
    model = _mlp()
    x = torch.rand(1, 1, 28, 28)
    kw = dict(sigma=0.5, n0=5, n=40, seed=2, backend="triton", precision="fp32")
    a = engine.certify(model, x, **kw)
    first = accel._CACHE[-1][3]
    engine.certify(model, x, **kw)
    assert accel._CACHE[-1][3] is first and len(accel._CACHE) == 1
    with torch.no_grad():
        model[-1].bias[int(a.counts_estimation.argmax())] -= 1e4  # the top class can no longer win
    b = engine.certify(model, x, **kw)
    assert accel._CACHE[-1][3] is not first
    assert int(b.counts_estimation[0, int(a.counts_estimation.argmax())]) == 0


def test_errors(monkeypatch):
    model = _mlp()
    x = torch.rand(1, 1, 28, 28)
    with pytest.raises(ValueError, match="precision"):
        engine.certify(model, x, sigma=0.5, n0=5, n=10, precision="int8")
    with pytest.raises(ValueError, match="precision"):
        engine.predict(model, x, sigma=0.5, n=10, precision="fp64")

    class NaNModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x.flatten(1)) * float("nan")

    with pytest.raises(ValueError, match="NaN or infinite"):
        engine.certify(NaNModel(), torch.rand(1, 1, 2, 2), sigma=0.5, n0=5, n=10, backend="triton")

    class BadShape(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="logits of shape"):
        engine.certify(BadShape(), torch.rand(1, 1, 2, 2), sigma=0.5, n0=5, n=10, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA model"):  # an InputError, before any sampling
        engine.certify(model, x, sigma=0.5, n0=5, n=10, backend="triton")
    monkeypatch.setenv("ENGINE_FORWARD_ROWS", "0")
    with pytest.raises(ValueError, match="ENGINE_FORWARD_ROWS"):
        accel.default_forward_rows(784, torch.device("cpu"))


def test_precision_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert accel.resolve_precision("auto", cpu, "auto") == "fp32"
    assert accel.resolve_precision("auto", cuda, "auto") == "bf16"
    assert accel.resolve_precision("auto", cuda, "torch") == "fp32"
    assert accel.resolve_precision("fp16", cpu, "torch") == "fp16"
    assert accel.default_forward_rows(3072, cuda) == 1024 and accel.default_forward_rows(784, cuda) == 4096


# ----------------------------------------------------------------------------------------------
# CUDA: the real fast path (graphs, fused kernels on the GPU)
# ----------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet8"])
def test_cuda_triton_fp32_equals_torch(name):
    build, shape, kind = MODELS[name]
    model = build().cuda()
    x = torch.rand((2,) + shape)
    ids = torch.tensor([0, 1])
    n0, n, seed, sigma = 64, 4000, 11, 0.5
    kw = dict(sigma=sigma, n0=n0, n=n, alpha=0.01, seed=seed, image_ids=ids, precision="fp32")
    ref = engine.certify(model, x.cuda(), backend="torch", **kw)
    got = engine.certify(model, x.cuda(), backend="triton", **kw)
    sampler = accel._CACHE[-1][3]
    assert sampler.kind == kind
    if kind != "mlp":
        assert sampler.forward.graph is not None, "CUDA graph capture failed"
    gap = min(
        top2_gap(float64_logits(model.cpu(), packed_noisy_rows(x, ids, num, seed=seed, stream=s, sigma=sigma)[0]))
        for num, s in ((n0, noise.STREAM_SELECTION), (n, noise.STREAM_ESTIMATION))
    )
    if gap > MIN_GAP:  # no sample near a tie: the float32 computations must agree exactly
        assert torch.equal(got.counts_estimation, ref.counts_estimation)
    else:  # near-ties present: only those samples may move
        assert int((got.counts_estimation - ref.counts_estimation).abs().sum()) <= 4


@gpu
def test_cuda_auto_bf16_batch_size_invariant_and_close():
    model = _resnet().cuda()
    x = torch.rand(2, 3, 32, 32).cuda()
    kw = dict(sigma=0.25, n0=100, n=5000, seed=4)
    a = engine.certify(model, x, batch_size=100, **kw)
    b = engine.certify(model, x, batch_size=3000, **kw)
    assert torch.equal(a.counts_estimation, b.counts_estimation) and torch.equal(a.counts_selection, b.counts_selection)
    fp32 = engine.certify(model, x, backend="torch", precision="fp32", **kw)
    # a broken bf16 path would move most samples; rounding moves the near-ties (a few percent at most)
    assert int((a.counts_estimation - fp32.counts_estimation).abs().sum()) < 0.05 * 2 * 5000


def test_cli_accepts_backend_and_precision():
    from engine.cli import build_parser

    args = build_parser().parse_args(
        ["certify", "--checkpoint", "m.safetensors", "--dataset", "mnist", "--sigma", "0.25", "--out", "o.tsv",
         "--backend", "triton", "--precision", "bf16"]
    )  # fmt: skip
    assert args.backend == "triton" and args.precision == "bf16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["certify", "--checkpoint", "m", "--dataset", "mnist", "--sigma", "1", "--out", "o",
                                   "--precision", "fp8"])
