"""Damaged, edited or foreign files given to the readers: one clear engine error naming the file, never a traceback of
json / KeyError / TypeError, and nothing of the size a header asks for allocated before it is checked against the
tensors (models.load / read_meta, PoisonSet.load, PoisonSet.from_checkpoint)."""

import ast
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine import models
from engine.models import CheckpointError
from engine.pacd import PoisonError, PoisonSet, _content_hash, _hash_clean, _save_checkpoint

HUGE = 10**12  # classes: a 2 PB lenet if it were ever allocated


def _contents(path, key):
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()[key]


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory):
    """A checkpoint of models.save, its tensors and its engine header."""
    path = tmp_path_factory.mktemp("ckpt") / "lenet.safetensors"
    models.save(models.lenet_mnist(), path, sigma=0.25)
    tensors, raw = _contents(path, "engine")
    return path, tensors, json.loads(raw)


def _edited(tmp_path, name, tensors, raw):
    out = tmp_path / name
    save_file(tensors, str(out), metadata={"engine": raw})
    return out


# -- checkpoints of engine.models --------------------------------------------------------------------------------------


def test_huge_num_classes_in_the_header_is_refused_on_the_shapes_before_allocating(lenet_file, tmp_path, monkeypatch):
    """num_classes=1e12 in arch_kwargs once attempted a 2 PB allocation: the architecture is built on the meta device
    and compared with the shapes in the safetensors header first."""
    _, tensors, header = lenet_file
    path = _edited(tmp_path, "huge.safetensors", tensors, json.dumps({**header, "arch_kwargs": {"num_classes": HUGE}}))
    devices = []
    build = models.build

    def spy(name, **kwargs):
        devices.append((torch.get_default_device().type, kwargs.get("num_classes")))
        return build(name, **kwargs)

    monkeypatch.setattr(models, "build", spy)
    with pytest.raises(CheckpointError, match=rf"huge\.safetensors: weights do not match lenet_mnist: 2 of the wrong "
                                              rf"shape \(10\.weight \[10, 500\] \(model \[{HUGE}, 500\]\)"):
        models.load(path)
    assert devices == [("meta", HUGE)]  # never built for real
    assert models.read_meta(path)["arch_kwargs"] == {"num_classes": HUGE}  # the header alone is well-formed


def test_huge_models_are_refused_within_a_small_address_space(lenet_file, tmp_path):
    """In a process limited to 6 GiB of address space: headers and arguments asking for a 2 PB or a 40 GB lenet are
    one CheckpointError each (a real build would fail to allocate: a RuntimeError or MemoryError)."""
    _, tensors, header = lenet_file
    paths = {}
    for n in (HUGE, 2 * 10**7):
        paths[n] = str(_edited(tmp_path, f"h{n}.safetensors", tensors, json.dumps({**header, "arch_kwargs": {"num_classes": n}})))
    torch.save(models.lenet_mnist().state_dict(), tmp_path / "sd.pt")
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        from engine import models
        calls = [lambda: models.load({paths[HUGE]!r}), lambda: models.load({paths[2 * 10**7]!r})]
        for f in ({str(tmp_path / "sd.pt")!r}, {str(tmp_path / "plain.safetensors")!r}):
            for n in ({HUGE}, {2 * 10**7}):
                calls.append(lambda f=f, n=n: models.load(f, arch="lenet", num_classes=n))
                calls.append(lambda f=f, n=n: models.load({paths[HUGE]!r}, arch="lenet", num_classes=n))
        for call in calls:
            try:
                call()
            except models.CheckpointError as exc:
                print("CheckpointError", str(exc).splitlines()[0][:200])
        print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len([ln for ln in lines if ln.startswith("CheckpointError")]) == 10, proc.stdout
    assert all("of the wrong shape" in ln or "not of lenet_mnist" in ln for ln in lines[:-1]), proc.stdout
    assert int(lines[-1].split()[1]) < 2 * 1024 * 1024  # under 2 GiB resident at its peak


@pytest.mark.parametrize("edit,message", [
    ({"arch_kwargs": {"num_classes": "10"}}, r"cannot rebuild architecture 'lenet_mnist': lenet_mnist: num_classes "
                                             r"must be an integer >= 1, got '10'"),
    ({"arch_kwargs": {"num_classes": [10]}}, "num_classes must be an integer >= 1, got \\[10\\]"),
    ({"arch_kwargs": {"num_classes": 1e12}}, "num_classes must be an integer >= 1, got 1000000000000.0"),
    ({"arch_kwargs": {"num_classes": -1}}, "num_classes must be an integer >= 1, got -1"),
    ({"arch_kwargs": {"num_classes": True}}, "num_classes must be an integer >= 1, got True"),
    ({"arch_kwargs": {"bogus": 1}}, "cannot rebuild architecture 'lenet_mnist': .*unexpected keyword argument 'bogus'"),
    ({"arch": "no_such_net"}, "cannot rebuild architecture 'no_such_net': unknown architecture"),
])
def test_arch_kwargs_of_the_wrong_type_or_an_unknown_arch(lenet_file, tmp_path, edit, message):
    _, tensors, header = lenet_file
    path = _edited(tmp_path, "k.safetensors", tensors, json.dumps({**header, **edit}))
    with pytest.raises(CheckpointError, match=rf"k\.safetensors: (cannot rebuild architecture .*: )?{message}"):
        models.load(path)


@pytest.mark.parametrize("raw,message", [
    ("{not json", r"damaged engine metadata \(Expecting property name"),
    ("[1, 2]", r"damaged engine metadata \(a JSON list, not an object\)"),
    ('"lenet"', r"damaged engine metadata \(a JSON str, not an object\)"),
    (json.dumps({"format": "engine.model/9"}), "unknown checkpoint format 'engine.model/9'"),
    ("HEADER:arch_kwargs=[10]", r"engine metadata missing or malformed: arch_kwargs=\[10\]"),
    ("HEADER:arch_kwargs='x'", "engine metadata missing or malformed: arch_kwargs='x'"),
    ("HEADER:arch=3", "engine metadata missing or malformed: arch=3"),
    ("HEADER:arch=['lenet']", r"engine metadata missing or malformed: arch=\['lenet'\]"),
    ("HEADER:arch=None", "engine metadata missing or malformed: arch=None"),
    ("HEADER:meta=[]", r"engine metadata missing or malformed: meta=\[\]"),
    ("HEADER:normalization=1", "engine metadata missing or malformed: normalization=1"),
])
def test_malformed_engine_headers(lenet_file, tmp_path, raw, message):
    """Invalid JSON, a header that is not an object, or fields of the wrong type: read_meta and load both refuse it."""
    _, tensors, header = lenet_file
    if raw.startswith("HEADER:"):
        key, value = raw[len("HEADER:"):].split("=", 1)
        raw = json.dumps({**header, key: ast.literal_eval(value)}) if value != "None" else json.dumps(
            {k: v for k, v in header.items() if k != key})
    path = _edited(tmp_path, "m.safetensors", tensors, raw)
    for read in (models.read_meta, models.load):
        with pytest.raises(CheckpointError, match=rf"m\.safetensors: {message}"):
            read(path)


def test_truncated_empty_and_foreign_checkpoints(lenet_file, tmp_path):
    path, _, _ = lenet_file
    whole = path.read_bytes()
    cases = {
        "truncated.safetensors": whole[: len(whole) - 100],  # the header whole, the tensors cut short
        "head.safetensors": whole[:40],  # cut inside the header: "cut short"
        "empty.safetensors": b"",
        "text.safetensors": b"hello, not a checkpoint\n",
        "zeros.safetensors": bytes(64),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        for read in (models.read_meta, models.load, lambda p: models.load(p, arch="lenet")):
            with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}: "):
                read(tmp_path / name)
    with pytest.raises(CheckpointError, match=r"head\.safetensors: a safetensors file cut short: its header is to take "
                                              r"\d+ bytes, the file ends after 32"):
        models.load(tmp_path / "head.safetensors", arch="lenet")
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors: not a readable safetensors file"):
        models.load(tmp_path / "truncated.safetensors")


def test_caller_arguments_asking_for_a_huge_or_invalid_model(tmp_path):
    """Weights without the engine's header: the caller's architecture is checked on the meta device too."""
    sd = tmp_path / "sd.pt"
    torch.save(models.lenet_mnist().state_dict(), sd)
    with pytest.raises(CheckpointError, match=rf"sd\.pt: weights do not match lenet_mnist {{\"num_classes\": {HUGE}}}"):
        models.load(sd, arch="lenet", num_classes=HUGE)
    for bad in (-1, 0, "10", 2.5):
        with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
            models.load(sd, arch="lenet", num_classes=bad)
    with pytest.raises(ValueError, match="hidden must be an integer >= 1"):
        models.mlp_mnist(hidden=0)
    with pytest.raises(ValueError, match="resnet_cifar: num_classes must be an integer >= 1"):
        models.resnet_cifar(20, num_classes=0)


def test_zoo_builds_on_the_meta_device():
    """What the shape check needs: every zoo architecture (Normalize included) builds without memory."""
    for name in ("lenet", "mlp", "resnet20"):
        with torch.device("meta"):
            model = models.build(name)
        assert all(t.device.type == "meta" for t in model.state_dict().values())
    assert models.lenet_mnist()[0].mean.device.type == "cpu"


def test_a_registered_constructor_that_cannot_run_on_meta_still_loads(tmp_path):
    """A constructor that computes with its weights does not build on the meta device; it is built for real instead."""
    from torch import nn

    def picky(width: int = 8):
        model = nn.Sequential(models.Normalize(models.MNIST_MEAN, models.MNIST_STD), nn.Flatten(), nn.Linear(784, width))
        assert float(model[2].weight.detach().abs().sum()) >= 0  # .item() on a meta tensor raises
        return model

    models.register("picky_net", picky)
    try:
        model = models.build("picky_net")
        models.save(model, tmp_path / "p.safetensors")
        loaded = models.load(tmp_path / "p.safetensors")
        assert torch.equal(loaded[2].weight, model[2].weight)
        torch.save(model.state_dict(), tmp_path / "p.pt")
        with pytest.raises(CheckpointError, match="wrong shape"):
            models.load(tmp_path / "p.pt", arch="picky_net", width=9)
    finally:
        models.unregister("picky_net")


# -- poison files --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_train():
    """A tiny training set: 12 uint8 images of 1x4x4, class 1 at 5 of them."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 0])
    return images, labels


@pytest.fixture(scope="module")
def poison_file(small_train, tmp_path_factory):
    images, labels = small_train
    idx = (labels == 1).nonzero().flatten()
    x0 = images[idx].float() / 255
    u = (x0 + 0.05).clamp(0, 1)
    ps = PoisonSet(idx, u, labels[idx], _hash_clean(images[idx], labels[idx]), 0.1, 0.5, "gaussian", 1,
                   {"dataset": "tiny"})
    path = tmp_path_factory.mktemp("poison") / "p.safetensors"
    ps.save(path)
    tensors, raw = _contents(path, "engine_poison")
    return path, tensors, json.loads(raw)


def _poison(tmp_path, name, tensors, header=None, raw=None):
    """A poison file of ``tensors`` and ``header`` whose sha256 matches (so that the later checks are reached)."""
    if raw is None:
        header = dict(header)
        if isinstance(header.get("meta"), dict):
            hashed = header["meta"] if header.get("encoding", "float32") == "float32" else {
                k: v for k, v in header.items() if k != "sha256"}
            header["sha256"] = _content_hash(tensors, hashed)
        raw = json.dumps(header)
    save_file(tensors, str(tmp_path / name), metadata={"engine_poison": raw})
    return tmp_path / name


def test_poison_file_round_trip(poison_file, small_train):
    path, _, _ = poison_file
    assert len(PoisonSet.load(path)) == 5 and len(PoisonSet.load(path, small_train)) == 5


@pytest.mark.parametrize("raw,message", [
    ("{not json", r"unreadable poison metadata \(Expecting property name"),
    ("[1, 2]", r"unreadable poison metadata \(a JSON list where PoisonSet.save writes an object\)"),
    ("null", r"unreadable poison metadata \(a JSON NoneType"),
    (json.dumps({"meta": [1], "sha256": "x"}), r"unreadable poison metadata \(a JSON list"),
    (json.dumps({"sha256": "x"}), "unknown poison format None"),
])
def test_poison_metadata_that_is_not_a_poison_header(poison_file, tmp_path, raw, message):
    _, tensors, _ = poison_file
    with pytest.raises(PoisonError, match=rf"q\.safetensors: {message}"):
        PoisonSet.load(_poison(tmp_path, "q.safetensors", tensors, raw=raw))


@pytest.mark.parametrize("edit,message", [
    ({"eps": "0.1"}, "poison metadata missing or malformed: eps='0.1'"),
    ({"eps": None}, "poison metadata missing or malformed: eps=None"),
    ({"sigma": [0.5]}, r"poison metadata missing or malformed: sigma=\[0.5\]"),
    ({"target_class": 1.5}, "poison metadata missing or malformed: target_class=1.5"),
    ({"settings": 5}, "poison metadata missing or malformed: settings=5"),
    ({"method": None, "clean_sha256": 7}, "poison metadata missing or malformed: clean_sha256=7, method=None"),
])
def test_poison_metadata_missing_keys_or_wrong_types(poison_file, tmp_path, edit, message):
    _, tensors, header = poison_file
    meta = {k: v for k, v in {**header["meta"], **edit}.items() if v is not None}
    with pytest.raises(PoisonError, match=rf"q\.safetensors: {message}"):
        PoisonSet.load(_poison(tmp_path, "q.safetensors", tensors, {**header, "meta": meta}))


@pytest.mark.parametrize("change,message", [
    (lambda t: {**t, "indices": t["indices"].float()}, r"indices \(5,\) float32 \(expected \(P,\) int64\)"),
    (lambda t: {**t, "indices": t["indices"].int()}, r"indices \(5,\) int32"),
    (lambda t: {**t, "indices": t["indices"].view(5, 1)}, r"indices \(5, 1\) int64"),
    (lambda t: {**t, "indices": -t["indices"]}, "indices negative or repeated"),
    (lambda t: {**t, "indices": torch.zeros(5, dtype=torch.int64)}, "indices negative or repeated"),
    (lambda t: {**t, "labels": t["labels"][:3]}, r"labels \(3,\) int64 \(expected \(5,\) int64\)"),
    (lambda t: {**t, "labels": t["labels"].float()}, r"labels \(5,\) float32"),
    (lambda t: {**t, "images": t["images"][:, 0]}, r"images \(5, 4, 4\) float32 \(expected \(5, C, H, W\) float32\)"),
    (lambda t: {**t, "images": t["images"].double()}, r"images \(5, 1, 4, 4\) float64"),
    (lambda t: {**t, "images": (t["images"] * 255).to(torch.uint8)}, r"images \(5, 1, 4, 4\) uint8"),
])
def test_poison_tensors_of_the_wrong_dtype_or_shape(poison_file, small_train, tmp_path, change, message):
    _, tensors, header = poison_file
    path = _poison(tmp_path, "q.safetensors", change(dict(tensors)), header)
    for train in (None, small_train):
        with pytest.raises(PoisonError, match=rf"q\.safetensors: malformed poison tensors: {message}"):
            PoisonSet.load(path, train)


def test_compact_poison_with_malformed_settings_and_no_training_set(poison_file, small_train, tmp_path):
    """The hint of a compact file loaded without its training set reads settings: they are checked first."""
    path, _, _ = poison_file
    PoisonSet.load(path, small_train).encode(small_train, "int8").save(tmp_path / "c.safetensors")
    tensors, raw = _contents(tmp_path / "c.safetensors", "engine_poison")
    header = json.loads(raw)
    with pytest.raises(PoisonError, match="pass the training set it was crafted on.*dataset tiny"):
        PoisonSet.load(tmp_path / "c.safetensors")
    bad = _poison(tmp_path, "q.safetensors", tensors, {**header, "meta": {**header["meta"], "settings": 5}})
    with pytest.raises(PoisonError, match=r"q\.safetensors: poison metadata missing or malformed: settings=5"):
        PoisonSet.load(bad)
    bad = _poison(tmp_path, "r.safetensors", {**tensors, "codes": tensors["codes"].to(torch.int16)}, header)
    with pytest.raises(PoisonError, match=r"r\.safetensors: malformed poison tensors: codes \(5, 1, 4, 4\) int16"):
        PoisonSet.load(bad, small_train)


def test_truncated_empty_and_foreign_poison_files(poison_file, tmp_path):
    path, tensors, _ = poison_file
    whole = path.read_bytes()
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    cases = {
        "truncated.safetensors": (whole[: len(whole) - 10], "not a readable safetensors file"),
        "head.safetensors": (whole[:30], "not a readable safetensors file"),
        "empty.safetensors": (b"", "not a readable safetensors file"),
        "text.safetensors": (b"hello, not a poison\n", "not a readable safetensors file"),
        "bare.safetensors": (None, "safetensors file without poison metadata"),
    }
    for name, (data, message) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(PoisonError, match=rf"{name.replace('.', '[.]')}: {message}"):
            PoisonSet.load(tmp_path / name)
    models.save(models.lenet_mnist(), tmp_path / "model.safetensors")  # a model is not a poison
    with pytest.raises(PoisonError, match="without poison metadata"):
        PoisonSet.load(tmp_path / "model.safetensors")
    with pytest.raises(PoisonError, match="no such poison set"):
        PoisonSet.load(tmp_path)  # a directory


# -- poisoning checkpoints -------------------------------------------------------------------------------------------------


@pytest.fixture
def run_checkpoint(small_train, tmp_path):
    """The tensors and metadata a poisoning run's checkpoint holds (as poison()'s save_state writes them)."""
    images, labels = small_train
    idx = (labels == 1).nonzero().flatten()
    u = images[idx].float() / 255
    tensors = {"w.0.weight": torch.zeros(3, 2), "u": u, "p": torch.zeros(6), "u_m": torch.zeros_like(u),
               "u_v": torch.zeros_like(u), "u_t": torch.zeros(5, dtype=torch.int64)}
    settings = {"target_class": 1, "method": "gaussian", "sigma": 0.5, "eps": 0.1,
                "clean_sha256": _hash_clean(images[idx], labels[idx])}
    meta = {"step": 2, "reset_index": 0, "p_t": 0, "settings": settings, "opt_w_groups": [{"lr": 0.01}],
            "history": [{"upper": 0.5, "seconds": 0.1}, {"upper": float("nan"), "seconds": 0.1}]}
    return tensors, meta


def _run_file(tmp_path, tensors, meta=None, raw=None):
    path = tmp_path / "run.ckpt"
    if raw is None:
        _save_checkpoint(path, tensors, meta)
    else:
        save_file(tensors, str(path), metadata={"engine_poison_checkpoint": raw})
    return path


def test_poisoning_checkpoint_round_trip(run_checkpoint, small_train, tmp_path):
    tensors, meta = run_checkpoint
    ps = PoisonSet.from_checkpoint(_run_file(tmp_path, tensors, meta), small_train)
    assert len(ps) == 5 and ps.settings["outer_steps"] == 2


@pytest.mark.parametrize("edit,message", [
    ("{not json", r"unreadable poisoning checkpoint metadata \(Expecting property name"),
    ("[1]", r"unreadable poisoning checkpoint metadata \(a JSON list, not an object\)"),
    ({"step": None}, "metadata missing or malformed: step=None"),
    ({"step": "2"}, "metadata missing or malformed: step='2'"),
    ({"settings": []}, r"metadata missing or malformed: settings=\[\]"),
    ({"history": [{"upper": "x"}]}, "metadata missing or malformed: history="),
    ({"opt_w_groups": {}}, "metadata missing or malformed: opt_w_groups={}"),
    ({"settings": {"eps": 0.1}}, "metadata missing or malformed: settings.target_class=None"),
    ("SETTINGS:target_class='x'", "metadata missing or malformed: settings.target_class='x'"),
    ("SETTINGS:eps=[0.1]", r"metadata missing or malformed: settings.eps=\[0.1\]"),
    ("TENSORS:u", "tensors missing or malformed: u absent"),
    ("TENSORS:u_t", "tensors missing or malformed: u_t absent"),
    ("TENSORS:p_m", r"tensors missing or malformed: p_v absent"),
])
def test_malformed_poisoning_checkpoints(run_checkpoint, small_train, tmp_path, edit, message):
    tensors, meta = run_checkpoint
    raw = None
    if isinstance(edit, dict):
        meta = {k: v for k, v in {**meta, **edit}.items() if v is not None}
    elif edit.startswith("SETTINGS:"):
        key, value = edit[len("SETTINGS:"):].split("=", 1)
        meta = {**meta, "settings": {**meta["settings"], key: ast.literal_eval(value)}}
    elif edit.startswith("TENSORS:"):
        key = edit[len("TENSORS:"):]
        tensors = {k: v for k, v in tensors.items() if k != key} if key != "p_m" else {**tensors, "p_m": torch.zeros(6)}
    else:
        raw = edit
    path = _run_file(tmp_path, tensors, meta, raw)
    with pytest.raises(PoisonError, match=rf"run\.ckpt: (poisoning checkpoint )?{message}"):
        PoisonSet.from_checkpoint(path, small_train)


def test_unreadable_poisoning_checkpoints(poison_file, small_train, tmp_path):
    for name, data in (("empty.ckpt", b""), ("text.ckpt", b"not a checkpoint at all")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(PoisonError, match=rf"{name.replace('.', '[.]')}: unreadable poisoning checkpoint"):
            PoisonSet.from_checkpoint(tmp_path / name, small_train)
    with pytest.raises(PoisonError, match="p.safetensors: not a poisoning checkpoint"):
        PoisonSet.from_checkpoint(poison_file[0], small_train)


@pytest.mark.parametrize("meta", ["{not json", "[1, 2]", '{"format": "engine-train-checkpoint-v1"}'])
def test_damaged_training_checkpoint_metadata(tmp_path, meta):
    import importlib

    from safetensors.torch import save_file

    train_module = importlib.import_module("engine.train")  # (engine.train is also the function)
    path = tmp_path / "t.ckpt"
    save_file({"model.w": torch.zeros(2)}, str(path), metadata={"engine": meta.replace(
        "engine-train-checkpoint-v1", str(train_module.CHECKPOINT_FORMAT))})
    with pytest.raises(models.CheckpointError, match="t.ckpt"):
        train_module.read_checkpoint_meta(path)
