"""PACD poisoning: poison-set files, projection invariants, resume, and the attack's effect."""

import dataclasses
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import data, models
from engine.pacd import PoisonError, PoisonSet, _solve_advice, derive_seed, init_record, poison, soft_radius_objective

TARGET = 3


def _tiny_mlp():
    return nn.Sequential(models.Normalize(models.MNIST_MEAN, models.MNIST_STD), nn.Flatten(), nn.Linear(784, 32), nn.ReLU(),
                         nn.Linear(32, 10))


SMALL = dict(target_class=TARGET, method="gaussian", sigma=0.5, eps=0.1, batch_clean=60, batch_poison=20, batch_val=20,
             k=4, niter1=3, niter2=3, lr_u=0.05, reset_every=0)


def _invariants(ps: PoisonSet, train):
    images, labels = train
    x0 = images[ps.indices].float() / 255
    assert float((ps.images - x0).abs().max()) <= ps.eps + 1e-6
    assert float(ps.images.min()) >= 0 and float(ps.images.max()) <= 1
    assert torch.equal(ps.labels, labels[ps.indices]) and bool((ps.labels == TARGET).all())
    assert torch.equal(ps.indices, (labels == TARGET).nonzero().flatten())


def test_projection_invariants_after_every_step_and_resume(tiny, tmp_path):
    train, val = tiny
    ckpt = tmp_path / "ck.safetensors"
    steps = []
    for s in range(1, 5):  # one outer step per call: each call resumes from the checkpoint
        ps = poison(_tiny_mlp, train, val, outer_steps=s, checkpoint=ckpt, checkpoint_every=1, seed=3, **SMALL)
        _invariants(ps, train)
        steps.append(ps.images.clone())
    assert not torch.equal(steps[0], steps[-1])  # the poison moves
    x0 = train[0][ps.indices].float() / 255
    assert float((steps[-1] - x0).abs().max()) > 0.9 * SMALL["lr_u"]  # at least one full Adam step
    # an uninterrupted run with the same seed gives the same poison, bit for bit
    straight = poison(_tiny_mlp, train, val, outer_steps=4, seed=3, **SMALL)
    assert torch.equal(straight.images, steps[-1])
    # another seed gives another poison
    other = poison(_tiny_mlp, train, val, outer_steps=4, seed=4, **SMALL)
    assert not torch.equal(other.images, steps[-1])
    # a checkpoint of other settings is refused
    with pytest.raises(PoisonError, match="other settings"):
        poison(_tiny_mlp, train, val, outer_steps=5, checkpoint=ckpt, seed=3, **{**SMALL, "eps": 0.2})


def test_time_based_checkpoints(tiny, tmp_path):
    from engine.pacd import _load_checkpoint

    train, val = tiny
    ckpt = tmp_path / "ck.safetensors"
    seen = []

    def log(entry):  # called before the step's checkpoint: the file holds the previous step
        if entry["step"] > 1:
            seen.append((entry["step"], _load_checkpoint(ckpt)[1]["step"]))

    entries = []
    poison(_tiny_mlp, train, val, outer_steps=4, checkpoint=ckpt, checkpoint_every=1000, checkpoint_seconds=0, seed=3,
           log=lambda e: (log(e), entries.append(e)), **SMALL)  # fmt: skip
    assert seen == [(2, 1), (3, 2), (4, 3)]
    for e in entries:  # each step's phases, timed one after another inside the step
        assert list(e["phases"]) == ["lower", "upper", "solve", "poison"]
        assert all(v >= 0 for v in e["phases"].values()) and sum(e["phases"].values()) <= e["seconds"] + 1e-6
    assert any(e["phases"]["solve"] > 0 and e["moved"] > 0 for e in entries)
    seen.clear()
    ckpt.unlink()
    poison(_tiny_mlp, train, val, outer_steps=3, checkpoint=ckpt, checkpoint_every=1000, checkpoint_seconds=None,
           seed=3, log=lambda e: seen.append(ckpt.exists()), **SMALL)  # fmt: skip
    assert seen == [False, False, False] and _load_checkpoint(ckpt)[1]["step"] == 3  # only the final one
    with pytest.raises(ValueError, match="checkpoint_seconds"):
        poison(_tiny_mlp, train, val, outer_steps=1, checkpoint_seconds=-1, **SMALL)
    from engine.fileio import ExclusiveLock, FileInUseError

    with ExclusiveLock(ckpt), pytest.raises(FileInUseError):  # a second run on the same checkpoint is refused
        poison(_tiny_mlp, train, val, outer_steps=4, checkpoint=ckpt, seed=3, **SMALL)
    assert _load_checkpoint(ckpt)[1]["step"] == 3  # untouched


def test_lower_model_resets_are_counted_and_a_run_without_one_warns(tiny):
    train, val = tiny  # 300 training images, batches of 60 + 20: 4 outer steps per epoch
    with pytest.warns(UserWarning, match="never re-initialised"):
        ps = poison(_tiny_mlp, train, val, outer_steps=2, **{**SMALL, "reset_every": 1})
    assert ps.settings["lower_resets"] == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*never re-initialised")
        ps = poison(_tiny_mlp, train, val, outer_steps=9, **{**SMALL, "reset_every": 1, "niter1": 1, "niter2": 1})
    assert ps.settings["lower_resets"] == 2  # at steps 4 and 8


def test_sign_updates_and_all_solvers_keep_invariants(tiny):
    train, val = tiny
    for solver in ("approxgrad", "cg", "neumann"):
        ps = poison(_tiny_mlp, train, val, outer_steps=2, solver=solver, u_update="sign", **{**SMALL, "lr_u": 0.03})
        _invariants(ps, train)


def test_poison_set_roundtrip_and_tamper(tiny, tmp_path):
    train, val = tiny
    ps = poison(_tiny_mlp, train, val, outer_steps=1, **SMALL)
    path = tmp_path / "p.safetensors"
    ps.save(path)
    back = PoisonSet.load(path)
    assert torch.equal(back.images, ps.images) and torch.equal(back.indices, ps.indices)
    assert back.settings == json.loads(json.dumps(ps.settings)) and back.eps == ps.eps and back.method == "gaussian"
    images, labels = back.apply(train)
    assert images.dtype == torch.float32 and torch.equal(labels, train[1])
    assert torch.equal(images[ps.indices], ps.images)
    others = torch.ones(labels.shape[0], dtype=torch.bool)
    others[ps.indices] = False
    assert torch.equal(images[others], train[0][others].float() / 255)

    # tampering with a tensor or with the metadata is detected
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    bad = dict(tensors)
    bad["images"] = tensors["images"].clone()
    bad["images"][0, 0, 0, 0] += 0.01
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(PoisonError, match="sha256"):
        PoisonSet.load(tmp_path / "bad.safetensors")
    header = json.loads(meta["engine_poison"])
    header["meta"]["eps"] = 0.5
    save_file(tensors, str(tmp_path / "bad2.safetensors"), metadata={"engine_poison": json.dumps(header)})
    with pytest.raises(PoisonError, match="sha256"):
        PoisonSet.load(tmp_path / "bad2.safetensors")
    with pytest.raises(PoisonError, match="no such"):
        PoisonSet.load(tmp_path / "missing.safetensors")

    # apply refuses other data
    images2 = train[0].clone()
    images2[ps.indices[0], 0, 0, 0] ^= 1
    with pytest.raises(PoisonError, match="originals"):
        ps.apply((images2, train[1]))
    labels2 = train[1].clone()
    labels2[ps.indices[0]] = 5
    with pytest.raises(PoisonError, match="labels"):
        ps.apply((train[0], labels2))


def test_argument_errors(tiny):
    train, val = tiny
    base = {**SMALL, "outer_steps": 1}
    for bad, match in [({"method": "pgd"}, "method"), ({"solver": "lbfgs"}, "solver"), ({"sigma": 0}, "sigma"),
                       ({"eps": -0.1}, "eps"), ({"niter2": 0}, "niter2"), ({"batch_poison": 0}, "batch_poison"),
                       ({"u_update": "sgd"}, "u_update"), ({"target_class": 7}, "target_class"), ({"a": 0.5}, "a must"),
                       ({"method_args": {"kk": 1}}, "unknown arguments")]:
        with pytest.raises(ValueError, match=match):
            poison(_tiny_mlp, train, val, **{**base, **bad})


def test_soft_radius_objective_matches_reference():
    torch.manual_seed(0)
    model = _tiny_mlp().double()
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    noise = torch.randn(5, 6, 1, 28, 28, dtype=torch.float64)
    f, counted = soft_radius_objective(model, x, 2, sigma=0.5, k=5, beta=16.0, a=0.001, noise=noise)
    from scipy.stats import norm

    total = 0.0
    n_counted = 0
    for i in range(6):
        p = sum(F.softmax(16.0 * model(x[i : i + 1] + 0.5 * noise[j, i : i + 1]), dim=1)[0] for j in range(5)) / 5
        if int(p.argmax()) == 2:
            n_counted += 1
            p2 = max(float(p[c]) for c in range(10) if c != 2)
            total += norm.ppf(0.998 * float(p[2]) + 0.001) - norm.ppf(0.998 * p2 + 0.001)
    assert counted == pytest.approx(n_counted / 6)
    assert float(f) == pytest.approx(0.25 * total / 6, rel=1e-9, abs=1e-12)


def test_derive_seed_independent_streams():
    seeds = {derive_seed(s, t, u) for s in range(4) for t in range(50) for u in range(5)}
    assert len(seeds) == 4 * 50 * 5 and all(0 <= s < 2**63 for s in seeds)


def test_upper_objective_decreases_for_retrained_models(tiny):
    """Models retrained from scratch on the poisoned set have a smaller soft certified radius on the
    target class than models trained on clean data (same seeds), and smaller than with random
    perturbations of the same size."""
    from engine import train as train_fn

    train, val = tiny
    xv = val[0][val[1] == TARGET].float() / 255
    noise = torch.randn((8,) + tuple(xv.shape), generator=torch.Generator().manual_seed(0))

    def objective_after_training(images, labels, seed):
        torch.manual_seed(seed)
        m = _tiny_mlp()
        train_fn(m, (images, labels), method="gaussian", sigma=0.5, epochs=15, batch_size=32, lr=1e-3, optimizer="adam",
                 schedule="constant", seed=seed)
        with torch.no_grad():
            return float(soft_radius_objective(m.eval(), xv, TARGET, sigma=0.5, k=8, noise=noise)[0])

    ps = poison(_tiny_mlp, train, val, outer_steps=20, seed=0, **{**SMALL, "lr_u": 0.03, "niter1": 5, "niter2": 5})
    poisoned = ps.apply(train)
    rand = poisoned[0].clone()
    signs = torch.randint(0, 2, ps.images.shape, generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    rand[ps.indices] = (train[0][ps.indices].float() / 255 + ps.eps * signs).clamp(0, 1)
    for seed in (0, 1):
        clean = objective_after_training(train[0], train[1], seed)
        attacked = objective_after_training(*poisoned, seed)
        random = objective_after_training(rand, train[1], seed)
        assert clean > 0.5  # the clean models certify the class at all
        assert attacked < 0.85 * clean, (seed, clean, attacked)
        assert attacked < random, (seed, random, attacked)


def test_cli_poison_and_evaluate(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "p.safetensors"
    base = [sys.executable, "-m", "engine", "poison", "--target-class", "8", "--sigma", "0.5", "--eps", "0.1", "--batch-clean",
            "60", "--batch-poison", "20", "--batch-val", "10", "--upper-k", "2", "--niter1", "2", "--niter2", "2",
            "--val-size", "9000", "--arch", "mlp", "--out", str(out), "--quiet", "--checkpoint-every", "1", "--keep-checkpoint"]
    proc = subprocess.run(base + ["--outer-steps", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    split = data.split_validation(*data.load_mnist(data.embedded_mnist_root(), "train"), 9000)[0]  # int8: decoded from it
    first = PoisonSet.load(out, split)
    assert first.settings["outer_steps"] == 2 and first.target_class == 8 and first.encoding == "int8"
    proc = subprocess.run(base + ["--outer-steps", "3"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    proc = subprocess.run(base + ["--outer-steps", "3", "--resume"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert PoisonSet.load(out, split).settings["outer_steps"] == 3
    ev = [sys.executable, "-m", "engine", "evaluate", "--val-size", "9000", "--victim-method", "gaussian", "--arch", "mlp",
          "--sigma", "0.5", "--epochs", "1", "--images", "3", "--n0", "10", "--n", "50", "--quiet"]
    proc = subprocess.run(ev + ["--poison", str(out), "--out-dir", str(tmp_path / "ev")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["poisoned"] and summary["images"] == 3 and summary["target_class"] == 8
    assert summary["schema_version"] >= 2 and summary["trace"]["dataset"] == "mnist"
    assert summary["trace"]["poison_content_sha256"] and summary["trace"]["torch_version"]
    assert json.loads((tmp_path / "ev" / "certify.json").read_text())["trace"]["command"] == "evaluate"
    assert 0 <= summary["clean_accuracy_other_classes"] <= 1
    proc = subprocess.run(ev + ["--out-dir", str(tmp_path / "ev2")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--clean" in proc.stderr
    proc = subprocess.run(ev + ["--clean", "--target-class", "8", "--out-dir", str(tmp_path / "evc")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    clean = json.loads((tmp_path / "evc" / "summary.json").read_text())
    proc = subprocess.run(ev + ["--poison", str(out), "--out-dir", str(tmp_path / "ev"), "--compare", str(tmp_path / "evc")],
                          capture_output=True, text=True)  # resumes: victim reloaded, certification log complete
    assert proc.returncode == 0, proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("| gaussian | mlp | 0.5 | gaussian |")]
    assert len(line) == 1 and f"| {clean['acr']:.4f} | {summary['acr']:.4f} |" in line[0], proc.stdout
    for kind in ("twin", "vertex"):  # the default controls, evaluated beside the poison with the same victim settings
        assert sum(x.startswith(f"| gaussian | mlp | 0.5 | control:{kind} |") for x in proc.stdout.splitlines()) == 1
        assert json.loads((tmp_path / "ev" / "controls" / f"{kind}-seed0" / "summary.json").read_text())["poisoned"]
        assert any(x.startswith(f"| {kind} |") for x in proc.stdout.splitlines())  # the poison minus control table
    proc = subprocess.run(ev + ["--poison", str(out), "--out-dir", str(tmp_path / "ev"), "--compare", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "summary.json" in proc.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(out.read_bytes()[:-7] + b"garbage")
    proc = subprocess.run(ev + ["--poison", str(bad), "--out-dir", str(tmp_path / "ev3")], capture_output=True, text=True)
    assert proc.returncode == 2 and "sha256" in proc.stderr


@pytest.mark.parametrize("method,margs", [("macer", {"k": 2, "lbd": 1.0}), ("smoothadv", {"eps": 0.5, "steps": 2, "m": 1})])
def test_macer_and_smoothadv_lower_levels(tiny, method, margs):
    train, val = tiny
    ps = poison(_tiny_mlp, train, val, outer_steps=2, method_args=margs, **{**SMALL, "method": method, "sigma": 0.75})
    _invariants(ps, train)
    x0 = train[0][ps.indices].float() / 255
    assert float((ps.images - x0).abs().max()) > 0  # the hypergradient moved the poison
    key = "k" if method == "macer" else "eps"
    assert ps.method == method and ps.settings["method_args"][key] == margs[key]


@pytest.mark.parametrize("method", ["gaussian", "smoothadv", "macer"])
def test_lower_products_agree_across_backends(method):
    """The cached and fused second-order products of a PACD step equal torch.func's on the same frozen noise (float64).
    MACER: the products on its loss's expansion at the logits (fused, double_backward) equal torch.func on
    the whole loss (its torch_func backend and the generic FuncLower), robustness term active (beta 2)."""
    from engine import bilevel
    from engine.pacd import _Functional, _Lower, _method_args, _Step

    torch.manual_seed(0)
    model = _tiny_mlp().double().eval()
    xc = torch.rand(9, 1, 28, 28, dtype=torch.float64)
    yc = model(xc).argmax(1).detach() if method == "macer" else torch.randint(0, 10, (9,))  # MACER's hinge needs y = top
    step = _Step(xc=xc, yc=yc, pos=torch.arange(4), yp=torch.full((4,), TARGET),
                 xv=torch.rand(3, 1, 28, 28, dtype=torch.float64), seed=123)
    u = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    margs = {"smoothadv": {"eps": 0.3, "steps": 2, "m": 1}, "gaussian": {},
             "macer": _method_args("macer", {"k": 3, "beta": 2.0, "gamma": 8.0, "lbd": 2.0})}[method]  # fmt: skip
    lower = _Lower(method, model, step, 0.5, margs)
    lower.prepare(u)
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, dtype=torch.float64)
    results = {}
    for backend in ("cached", "fused", "torch_func", "double_backward"):
        hvp, mixed = lower.products(u, 7, backend)
        results[backend] = (hvp(v), mixed(v))
    params = {k: p.detach() for k, p in model.named_parameters()}
    generic = bilevel.FuncLower(lambda prm, uu: lower.loss(_Functional(model, prm), uu, 7), params, u)
    results["generic"] = (generic.hvp(v), generic.mixed(v))
    for name, (hv, mx) in results.items():
        torch.testing.assert_close(hv, results["generic"][0], rtol=1e-10, atol=1e-14, msg=name)
        torch.testing.assert_close(mx, results["generic"][1], rtol=1e-10, atol=1e-14, msg=name)
    assert results["fused"][1].shape == u.shape
    if method == "macer":  # both MACER terms carry weight here, or the check would miss the robustness one
        from engine.losses import macer_inputs, macer_terms
        from engine.pacd import _generator

        x = torch.cat([step.xc, u])
        z = model(macer_inputs(x, 0.5, 3, _generator(x.device, step.seed, 7))).reshape(13, 3, 10)
        cls, rob = macer_terms(z, lower.y, 0.5, 2.0, 8.0)
        assert float(cls.abs().sum()) > 0 and int((rob != 0).sum()) >= 2


def test_snapshot_from_checkpoint(tiny, tmp_path):
    """A checkpoint's poison equals the poison of a run stopped at that step; another training set is refused."""
    import subprocess
    import sys

    train, val = tiny
    ckpt = tmp_path / "ck.safetensors"
    ps2 = poison(_tiny_mlp, train, val, outer_steps=2, checkpoint=ckpt, checkpoint_every=1, seed=5, **SMALL)
    snap = PoisonSet.from_checkpoint(ckpt, train)
    assert torch.equal(snap.images, ps2.images) and torch.equal(snap.indices, ps2.indices)
    assert torch.equal(snap.labels, ps2.labels) and snap.clean_sha256 == ps2.clean_sha256
    assert snap.settings["outer_steps"] == 2 and (snap.eps, snap.sigma, snap.method) == (0.1, 0.5, "gaussian")
    for key in ("upper_by_step", "step_seconds_total", "history_tail"):  # the run's log, as in the finished poison
        assert snap.settings[key] == ps2.settings[key]
    assert len(snap.settings["upper_by_step"]) == 2 and snap.settings["step_seconds_total"] > 0
    _invariants(snap, train)
    snap.save(tmp_path / "snap.safetensors")
    assert torch.equal(PoisonSet.load(tmp_path / "snap.safetensors").apply(train)[0], ps2.apply(train)[0])
    other = (train[0].clone(), train[1])
    other[0][(train[1] == TARGET).nonzero()[0, 0]] ^= 1  # one pixel of one target-class image differs
    with pytest.raises(PoisonError, match="not the originals"):
        PoisonSet.from_checkpoint(ckpt, other)
    with pytest.raises(PoisonError, match="no such"):
        PoisonSet.from_checkpoint(tmp_path / "none.ckpt", train)
    with pytest.raises(PoisonError, match="not a poisoning checkpoint"):
        PoisonSet.from_checkpoint(tmp_path / "snap.safetensors", train)

    # command line: a run's checkpoint -> poison file, on the same split
    out = tmp_path / "p.safetensors"
    base = [sys.executable, "-m", "engine", "poison", "--target-class", "8", "--sigma", "0.5", "--eps", "0.1", "--batch-clean",
            "60", "--batch-poison", "20", "--batch-val", "10", "--upper-k", "2", "--niter1", "1", "--niter2", "1",
            "--val-size", "9000", "--arch", "mlp", "--out", str(out), "--quiet", "--checkpoint-every", "1", "--outer-steps",
            "1", "--keep-checkpoint"]
    proc = subprocess.run(base, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cmd = [sys.executable, "-m", "engine", "poison-snapshot", str(out) + ".ckpt", "--val-size", "9000",
           "--out", str(tmp_path / "s.safetensors")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    split = data.split_validation(*data.load_mnist(data.embedded_mnist_root(), "train"), 9000)[0]  # int8: decoded from it
    s = PoisonSet.load(tmp_path / "s.safetensors", split)
    assert torch.equal(s.images, PoisonSet.load(out, split).images) and s.settings["outer_steps"] == 1
    proc = subprocess.run(cmd[:-4] + ["--val-size", "8000", "--out", str(tmp_path / "t.safetensors")], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "not the originals" in proc.stderr


def test_evaluate_reuses_a_victim_with_the_same_settings_only(tiny, tmp_path, monkeypatch):
    """reuse_victims_from: a victim trained with identical settings elsewhere is copied and certified anew;
    one trained otherwise (other epochs) is not."""
    import sys

    from engine.evaluate import evaluate_poison

    train_module = sys.modules["engine.train"]  # (engine.train is also the function's name in the package)

    train, _ = tiny
    test = (train[0][:60], train[1][:60])
    common = dict(target_class=TARGET, victim_method="gaussian", arch="mlp", sigma=0.5, epochs=1, n_images=3, n0=10)
    first = evaluate_poison(None, train, test, n=50, out_dir=tmp_path / "a", **common)
    trained = {"calls": 0}
    real_train = train_module.train

    def counting_train(*a, **k):
        trained["calls"] += 1
        return real_train(*a, **k)

    monkeypatch.setattr(train_module, "train", counting_train)
    again = evaluate_poison(None, train, test, n=80, out_dir=tmp_path / "b", reuse_victims_from=[tmp_path / "x", tmp_path / "a"],
                            **common)
    assert trained["calls"] == 0 and again["n"] == 80 and again["train_seconds"] == first["train_seconds"]
    a, b = models.load(tmp_path / "a" / "victim.safetensors"), models.load(tmp_path / "b" / "victim.safetensors")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert again["clean_accuracy_other_classes"] == first["clean_accuracy_other_classes"]
    other = evaluate_poison(None, train, test, n=50, out_dir=tmp_path / "c", reuse_victims_from=[tmp_path / "a"],
                            **{**common, "epochs": 2})
    assert trained["calls"] == 1 and other["train_settings"]["epochs"] == 2


def test_evaluate_sets_aside_the_victim_and_results_of_other_settings(tiny, tmp_path, monkeypatch):
    """An out_dir holding a victim of other settings (e.g. of an earlier version of the poison) and its
    certification: both are moved into out_dir/superseded/<victim digest>/ unchanged, with a warning, and the
    new victim is trained and certified; a certification of another victim beside the right victim is moved
    aside too (no retraining); a victim copied in by reuse_victims_from does not overwrite one of other settings."""
    import shutil
    import sys

    from engine.evaluate import evaluate_poison

    train_module = sys.modules["engine.train"]
    train, _ = tiny
    test = (train[0][:60], train[1][:60])
    common = dict(target_class=TARGET, victim_method="gaussian", arch="mlp", sigma=0.5, n_images=3, n0=10, n=40)
    a = tmp_path / "a"
    first = evaluate_poison(None, train, test, out_dir=a, epochs=1, **common)
    old_files = {n: (a / n).read_bytes() for n in ("victim.safetensors", "certify.tsv", "certify.json", "summary.json")}
    old_digest = json.loads((a / "certify.json").read_text())["settings"]["victim"]
    with pytest.warns(RuntimeWarning, match="trained with other settings"):
        second = evaluate_poison(None, train, test, out_dir=a, epochs=2, **common)
    kept = a / "superseded" / old_digest
    assert {n: (kept / n).read_bytes() for n in old_files} == old_files  # the old victim and its results, intact
    assert json.loads(old_files["summary.json"])["acr"] == first["acr"]
    assert second["train_settings"]["epochs"] == 2 and models.read_meta(a / "victim.safetensors")["meta"][
        "train_settings"]["epochs"] == 2
    new_digest = json.loads((a / "certify.json").read_text())["settings"]["victim"]
    assert new_digest != old_digest and len((a / "certify.tsv").read_text().splitlines()) == 1 + 3
    # the new victim beside the old victim's certification (its weights already replaced): only re-certified
    b = tmp_path / "b"
    b.mkdir()
    shutil.copyfile(a / "victim.safetensors", b / "victim.safetensors")
    for n in ("certify.tsv", "certify.json", "summary.json"):
        shutil.copyfile(kept / n, b / n)
    calls = []
    real_train = train_module.train
    monkeypatch.setattr(train_module, "train", lambda *x, **k: calls.append(1) or real_train(*x, **k))
    with pytest.warns(RuntimeWarning, match="certification there is of another victim"):
        third = evaluate_poison(None, train, test, out_dir=b, epochs=2, **common)
    assert calls == [] and third["acr"] == second["acr"]
    assert (b / "superseded" / old_digest / "certify.tsv").read_bytes() == old_files["certify.tsv"]
    assert json.loads((b / "certify.json").read_text())["settings"]["victim"] == new_digest
    # a victim reused from elsewhere replaces no victim of other settings
    c = tmp_path / "c"
    c.mkdir()
    shutil.copyfile(kept / "victim.safetensors", c / "victim.safetensors")
    with pytest.warns(RuntimeWarning, match="trained with other settings"):
        evaluate_poison(None, train, test, out_dir=c, epochs=2, reuse_victims_from=[a], **common)
    assert calls == [] and (c / "superseded" / old_digest / "victim.safetensors").read_bytes() == old_files["victim.safetensors"]
    assert (c / "victim.safetensors").read_bytes() == (a / "victim.safetensors").read_bytes()


def test_evaluate_resumes_an_interrupted_victim_training(tiny, tmp_path, monkeypatch):
    """A victim training that crashes after an epoch continues from out_dir's checkpoint on the next call and
    ends with the weights of an uninterrupted run; the checkpoint is removed once the victim is saved, and a
    checkpoint of other settings is replaced (with a warning), not resumed."""
    import sys

    from engine.evaluate import evaluate_poison

    train_module = sys.modules["engine.train"]
    real_train = train_module.train
    train, _ = tiny
    test = (train[0][:60], train[1][:60])
    common = dict(target_class=TARGET, victim_method="gaussian", arch="mlp", sigma=0.5, epochs=2, n_images=3, n0=10, n=40)
    whole = evaluate_poison(None, train, test, out_dir=tmp_path / "a", **common)
    assert not (tmp_path / "a" / "victim.train.ckpt").exists()

    class Crash(RuntimeError):
        pass

    def crash_after_epoch_1(*a, **k):
        real_train(*a, **{**k, "stop_after_epoch": 1})
        raise Crash("power cut")

    monkeypatch.setattr(train_module, "train", crash_after_epoch_1)
    with pytest.raises(Crash):
        evaluate_poison(None, train, test, out_dir=tmp_path / "b", **common)
    with pytest.raises(Crash):
        evaluate_poison(None, train, test, out_dir=tmp_path / "c", **{**common, "lr": 0.03})
    assert (tmp_path / "b" / "victim.train.ckpt").exists() and not (tmp_path / "b" / "victim.safetensors").exists()
    assert train_module.read_checkpoint_meta(tmp_path / "b" / "victim.train.ckpt")["epoch"] == 1
    calls = []

    epochs_run = set()

    def recording_train(*a, **k):
        calls.append(k["checkpoint"])
        shown = k["progress"]

        def progress(info):
            epochs_run.add(info["epoch"])
            if shown is not None:
                shown(info)

        return real_train(*a, **{**k, "progress": progress})

    monkeypatch.setattr(train_module, "train", recording_train)
    resumed = evaluate_poison(None, train, test, out_dir=tmp_path / "b", progress=True, **common)
    assert calls == [tmp_path / "b" / "victim.train.ckpt"] and not calls[0].exists()
    assert epochs_run == {2}  # continued after the checkpointed epoch 1, not trained again
    a, b = models.load(tmp_path / "a" / "victim.safetensors"), models.load(tmp_path / "b" / "victim.safetensors")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert resumed["acr"] == whole["acr"] and resumed["train_seconds"] > 0
    # the stale checkpoint (lr 0.03) moved into a fresh directory is not continued with lr 0.01: trained again
    (tmp_path / "d").mkdir()
    (tmp_path / "c" / "victim.train.ckpt").rename(tmp_path / "d" / "victim.train.ckpt")
    with pytest.warns(RuntimeWarning, match="not resumed"):
        evaluate_poison(None, train, test, out_dir=tmp_path / "d", **common)
    d = models.load(tmp_path / "d" / "victim.safetensors")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), d.state_dict().values()))
    assert not (tmp_path / "d" / "victim.train.ckpt").exists()


def test_solve_residuals_logged_and_a_diverging_solve_warns(tiny):
    train, val = tiny
    log: list = []
    ps = poison(_tiny_mlp, train, val, outer_steps=2, log=log.append, **SMALL)
    for entry in log:
        first, last = entry["solve_residual"]
        assert first == pytest.approx(1.0) if entry["step"] == 1 else first > 0  # p starts at 0
        assert 0 < last < 10
    assert ps.settings["history_tail"][-1]["solve_residual"] == log[-1]["solve_residual"]
    with pytest.warns(UserWarning, match=r"worse than p = 0.*lower lr_p \(now 100\)"):
        poison(_tiny_mlp, train, val, outer_steps=2, lr_p=100.0, **SMALL)
    with pytest.warns(UserWarning, match=r"worse than p = 0.*2 / lambda_max"):
        poison(_tiny_mlp, train, val, outer_steps=2, lr_p=100.0, solver="neumann", **SMALL)
    # CG has no step size: its advice is the damping, never lr_p
    assert "damping (now 0.001)" in _solve_advice("cg", 0.01, 1e-3) and "lr_p (now" not in _solve_advice("cg", 0.01, 1e-3)


@pytest.mark.filterwarnings(r"ignore:step \d+. the approxgrad solve")
def test_warm_start_from_a_poison_set(tiny, tmp_path, monkeypatch):
    import engine.pacd as pacd

    train, val = tiny
    first = poison(_tiny_mlp, train, val, outer_steps=4, seed=3, **SMALL)  # moves (see the first test)
    path = tmp_path / "first.safetensors"
    first.save(path)
    first = PoisonSet.load(path)
    # no new steps: the poison starts at init's images (inside this run's box), projected onto a smaller eps
    same = poison(_tiny_mlp, train, val, outer_steps=0, seed=3, init=first, **SMALL)
    assert torch.equal(same.images, first.images)
    small = poison(_tiny_mlp, train, val, outer_steps=0, seed=3, init=first, **{**SMALL, "eps": 0.03})
    x0 = train[0][first.indices].float() / 255
    assert float((small.images - x0).abs().max()) <= 0.03 + 1e-6 < float((first.images - x0).abs().max())
    assert torch.equal(small.images, torch.minimum(torch.maximum(first.images, x0 - 0.03), x0 + 0.03))
    # the schedule continues after init's 4 steps: minibatch keys (seed, step, 2) for steps 4 and 5, not 0 and 1
    keys = []
    import engine.pacd.crafter as crafter  # where the outer steps draw their keyed generators

    real = crafter._generator

    def spy(device, *parts):
        if len(parts) == 3 and parts[2] == 2:
            keys.append(parts[1])
        return real(device, *parts)

    monkeypatch.setattr(crafter, "_generator", spy)
    warm = poison(_tiny_mlp, train, val, outer_steps=2, seed=3, init=first, **SMALL)
    assert keys == [4, 5]
    monkeypatch.setattr(crafter, "_generator", real)
    _invariants(warm, train)
    assert not torch.equal(warm.images, first.images)
    assert warm.settings["outer_steps"] == 2 and warm.settings["total_outer_steps"] == 6
    assert warm.settings["init"]["outer_steps"] == 4 and warm.settings["init"]["sha256"] == pacd.init_record(first)["sha256"]
    assert [e["step"] for e in warm.settings.get("history", [])] in ([], [1, 2])
    # a warm start of a warm start continues after both
    keys.clear()
    monkeypatch.setattr(crafter, "_generator", spy)
    poison(_tiny_mlp, train, val, outer_steps=1, seed=3, init=warm, **SMALL)
    monkeypatch.setattr(crafter, "_generator", real)
    assert keys == [6]
    # interrupted and resumed from its checkpoint, a warm-started run gives the same poison as an uninterrupted one
    ckpt = tmp_path / "warm.ckpt"
    poison(_tiny_mlp, train, val, outer_steps=1, seed=3, init=first, checkpoint=ckpt, checkpoint_every=1, **SMALL)
    resumed = poison(_tiny_mlp, train, val, outer_steps=2, seed=3, init=first, checkpoint=ckpt, checkpoint_every=1, **SMALL)
    assert torch.equal(resumed.images, warm.images)
    # ... and its checkpoint is not resumed with another init (or none)
    with pytest.raises(PoisonError, match="other settings.*init"):
        poison(_tiny_mlp, train, val, outer_steps=3, seed=3, init=warm, checkpoint=ckpt, **SMALL)
    with pytest.raises(PoisonError, match="other settings.*init"):
        poison(_tiny_mlp, train, val, outer_steps=3, seed=3, checkpoint=ckpt, **SMALL)
    # the never-re-initialised warning looks at the steps this run does (here 4 per epoch, schedule steps 4-7 / 4-8)
    with pytest.warns(UserWarning, match="never re-initialised"):
        poison(_tiny_mlp, train, val, outer_steps=4, seed=3, init=first, **{**SMALL, "reset_every": 1})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*never re-initialised")
        crossed = poison(_tiny_mlp, train, val, outer_steps=5, seed=3, init=first, **{**SMALL, "reset_every": 1})
    assert crossed.settings["lower_resets"] == 2
    # a poison of another class or another training set is refused, naming init
    other_class = poison(_tiny_mlp, train, val, outer_steps=0, seed=3, **{**SMALL, "target_class": 5})
    with pytest.raises(PoisonError, match="init: a poison of class 5"):
        poison(_tiny_mlp, train, val, outer_steps=1, seed=3, init=other_class, **SMALL)
    shifted = (train[0][1:], train[1][1:])
    with pytest.raises(PoisonError, match="init: .*same training split"):
        poison(_tiny_mlp, shifted, val, outer_steps=1, seed=3, init=first, **SMALL)
    with pytest.raises(TypeError, match="init must be a PoisonSet"):
        poison(_tiny_mlp, train, val, outer_steps=1, seed=3, init=str(path), **SMALL)


def _assert_vertex(ps: PoisonSet, x0, direction, eps):
    """ps.images is the vertex of the eps box around x0 (within [0, 1]) that ``direction`` points to: every pixel
    eps from x0 along the sign of direction or at the [0, 1] bound on that side, and exactly x0 where it is 0."""
    u, s = ps.images.double(), direction.sign()
    assert torch.allclose(u, (x0 + eps * s).clamp(0, 1), atol=1e-6)
    off = u - x0
    on_box = ((off.abs() - eps).abs() <= 1e-6) & (off.sign() == s)
    at_bound = ((u == 1) & (s > 0)) | ((u == 0) & (s < 0))
    assert bool((on_box | at_bound)[s != 0].all())
    assert torch.equal(u[s == 0], x0[s == 0])


@pytest.mark.filterwarnings(r"ignore:step \d+. the (approxgrad|cg) solve")
def test_combine_poisons(tiny, tmp_path):
    """combine_poisons: the vote moves every pixel by eps along the sign of the summed perturbations (0 where it
    is 0), the mean averages the images; both keep the invariants, record their inputs and the settings they do
    not share, and refuse poisons of other images or settings and another training set; the command line too.
    What the crafted poisons look like depends on the CPU's rounding (they may or may not sit at a vertex already),
    so their votes are checked against the sign rule only; the moves are checked on poisons built by hand."""
    from engine import cli
    from engine.pacd import _hash_clean, combine_poisons

    train, val = tiny
    small = {**SMALL, "lr_u": 0.1}
    parts = [poison(_tiny_mlp, train, val, outer_steps=5, seed=s, **small) for s in (1, 2)]
    parts.append(poison(_tiny_mlp, train, val, outer_steps=6, seed=3, solver="cg", **small))
    x0 = (train[0][parts[0].indices].float() / 255).double()  # the originals as the poisons hold them (float32)
    d = torch.stack([ps.images.double() - x0 for ps in parts])
    vote = combine_poisons(parts, train, "vote")
    _invariants(vote, train)
    _assert_vertex(vote, x0, d.sum(0), 0.1)
    mean = combine_poisons(parts, train, "mean")
    _invariants(mean, train)
    assert torch.allclose(mean.images.double(), torch.stack([ps.images.double() for ps in parts]).mean(0), atol=1e-6)
    s = vote.settings
    assert s["combine"] == "vote" and [r["sha256"] for r in s["combined_from"]] == [init_record(ps)["sha256"] for ps in parts]
    assert s["combined_differ"] == ["seed", "solver"] and "solver" not in s and s["lr_u"] == 0.1
    assert s["total_outer_steps"] == 6 and s["outer_steps"] == 0 and "upper_by_step" not in s
    vote.save(tmp_path / "v.safetensors")
    assert torch.equal(PoisonSet.load(tmp_path / "v.safetensors").images, vote.images)
    assert init_record(vote)["total_outer_steps"] == 6  # a warm start from it continues after every input's steps

    with pytest.raises(ValueError, match="how must be one of"):
        combine_poisons(parts, train, "median")
    with pytest.raises(TypeError, match="two or more PoisonSets for how='mean'"):
        combine_poisons(parts[:1], train, "mean")
    with pytest.raises(TypeError, match="one or more PoisonSets for how='vote'"):
        combine_poisons([], train)
    snap = combine_poisons(parts[2:], train)  # one poison: out to the vertex along its own signs
    _invariants(snap, train)
    _assert_vertex(snap, x0, d[2], 0.1)

    # poisons built inside the box (|u - x0| <= 3 eps / 4, a random sign or 0 per pixel), so provably off the vertex
    g = torch.Generator().manual_seed(0)
    inner = [dataclasses.replace(parts[2], images=(x0 + 0.025 * torch.randint(-3, 4, x0.shape, generator=g)).clamp(0, 1)
                                 .float()) for _ in range(2)]  # fmt: skip
    di = [ps.images.double() - x0 for ps in inner]
    snap = combine_poisons(inner[:1], train)
    _invariants(snap, train)
    _assert_vertex(snap, x0, di[0], 0.1)
    u, moved = inner[0].images.double(), di[0] != 0
    there = ~moved | ((u == 1) & (di[0] > 0)) | ((u == 0) & (di[0] < 0))  # already at the vertex: unmoved or at a bound
    assert bool(there.any()) and bool((~there).any())
    assert torch.equal(snap.images.double() == u, there)  # every other pixel moves out to it
    vote2 = combine_poisons(inner, train)
    _assert_vertex(vote2, x0, di[0] + di[1], 0.1)
    agree = (di[0] > 0) & (di[1] > 0) & (x0 <= 0.9)  # both inputs moved up, with room for eps: the vote moves up by eps
    assert bool(agree.any()) and torch.allclose(vote2.images.double()[agree], x0[agree] + 0.1, atol=1e-6)
    wide = PoisonSet(parts[1].indices, parts[1].images, parts[1].labels, parts[1].clean_sha256, 0.2, 0.5, "gaussian", TARGET)
    with pytest.raises(PoisonError, match=r"poisons\[1\] .*eps 0.2.* is not a poison of the same images and settings"):
        combine_poisons([parts[0], wide], train)
    other = (train[0].clone(), train[1])
    other[0][parts[0].indices[0]] ^= 1
    with pytest.raises(PoisonError, match="not the originals"):
        combine_poisons(parts, other)
    # poisons of other procedures: refused unless mixed_methods; then the method names them all
    macer = dataclasses.replace(parts[1], method="macer")
    with pytest.raises(PoisonError, match=r"poisons\[1\] \(macer.*mixed_methods=True combines procedures"):
        combine_poisons([parts[0], macer], train)
    mixed = combine_poisons([parts[0], macer, parts[2]], train, mixed_methods=True)
    assert mixed.method == "gaussian+macer" and mixed.settings["combined_methods"] == ["gaussian", "macer", "gaussian"]
    assert torch.equal(mixed.images, vote.images)  # the same images: only the names differ
    assert "combined_methods" not in combine_poisons(parts, train, mixed_methods=True).settings
    with pytest.raises(PoisonError, match=r"poisons\[1\] .*eps 0.2"):
        combine_poisons([parts[0], wide], train, mixed_methods=True)  # eps, sigma and images must still agree

    # command line, on a split of the embedded subset: two poisons pushing every pixel up / down by eps
    images, labels = data.load_mnist(data.embedded_mnist_root(), "train")
    (tx, ty), _ = data.split_validation(images, labels, 9000)
    idx = (ty == 8).nonzero().flatten()
    base = tx[idx].float() / 255
    for name, sign in (("up", 1), ("down", -1)):
        PoisonSet(idx, (base + sign * 0.1).clamp(0, 1), ty[idx], _hash_clean(tx[idx], ty[idx]), 0.1, 0.5, "gaussian",
                  8).save(tmp_path / f"{name}.safetensors")
    out = tmp_path / "c.safetensors"
    argv = ["poison-combine", str(tmp_path / "up.safetensors"), str(tmp_path / "down.safetensors"), "--val-size", "9000"]
    assert cli.main(argv + ["--how", "mean", "--out", str(out)]) == 0
    c = PoisonSet.load(out, (tx, ty))  # a mean is stored as int8 (quantised to eps / 127 steps), a vote as sign
    assert torch.allclose(c.images, ((base + 0.1).clamp(0, 1) + (base - 0.1).clamp(0, 1)) / 2, atol=0.1 / 254 + 1e-6)
    assert c.settings["combine"] == "mean" and c.settings["val_size"] == 9000
    assert cli.main(argv + ["--out", str(out)]) == 2  # an existing --out is not replaced without --overwrite
    assert cli.main(argv + ["--out", str(out), "--overwrite"]) == 0  # vote: +eps where the sum is positive, else -eps or 0
    assert cli.main(argv[:2] + ["--how", "mean", "--out", str(out), "--overwrite"]) == 2  # mean of one
    assert cli.main(argv[:2] + ["--val-size", "9000", "--out", str(out), "--overwrite"]) == 0  # vote of one: up by eps
    assert torch.allclose(PoisonSet.load(out, (tx, ty)).images, (base + 0.1).clamp(0, 1), atol=1e-6)
    assert cli.main(argv[:3] + ["--val-size", "8000", "--out", str(out), "--overwrite"]) == 2  # another split
    PoisonSet(idx, (base + 0.1).clamp(0, 1), ty[idx], _hash_clean(tx[idx], ty[idx]), 0.1, 0.5, "smoothadv",
              8).save(tmp_path / "sa.safetensors")
    argv = ["poison-combine", str(tmp_path / "sa.safetensors"), str(tmp_path / "down.safetensors"), "--val-size", "9000"]
    assert cli.main(argv + ["--out", str(out), "--overwrite"]) == 2  # procedures differ
    assert cli.main(argv + ["--mixed-methods", "--how", "mean", "--out", str(out), "--overwrite"]) == 0
    assert PoisonSet.load(out, (tx, ty)).method == "gaussian+smoothadv"
