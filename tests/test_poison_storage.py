"""Compact poison files: int8 and sign encodings (PoisonSet.encode / save / load), their refusals and the commands."""

import json

import pytest
import torch

from engine import cli, data
from engine.pacd import (
    PoisonError,
    PoisonSet,
    _content_hash,
    _hash_clean,
    _int8_scale,
    combine_poisons,
    init_record,
    poison,
    read_poison_header,
)

EPS = 0.1


@pytest.fixture(scope="module")
def split():
    """The embedded MNIST subset less 9,000 validation images (1,000 training images), as the commands build it."""
    images, labels = data.load_mnist(data.embedded_mnist_root(), "train")
    return data.split_validation(images, labels, 9000)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.float32 and torch.equal(_bits(a), _bits(b))


def _originals(ps: PoisonSet, train) -> torch.Tensor:
    return train[0][ps.indices].float() / 255


def _invariants(ps: PoisonSet, train) -> None:
    """The eps box (the tolerance of tests/test_poison.py), [0, 1] and clean labels."""
    x0 = _originals(ps, train)
    assert float((ps.images - x0).abs().max()) <= ps.eps + 1e-6
    assert float(ps.images.min()) >= 0 and float(ps.images.max()) <= 1
    assert torch.equal(ps.labels, train[1][ps.indices])


def _random_poison(train, seed: int, target: int = 8, method: str = "gaussian") -> PoisonSet:
    """A poison of every image of ``target`` anywhere in its box: uniform inside, a third of the pixels at x0 +- eps
    (then [0, 1]), and a few left at x0."""
    x, y = train
    idx = (y == target).nonzero().flatten()
    x0 = x[idx].float() / 255
    g = torch.Generator().manual_seed(seed)
    u = x0 + EPS * (2 * torch.rand(x0.shape, generator=g) - 1)
    pick = torch.rand(x0.shape, generator=g)
    u = torch.where(pick < 0.33, x0 + EPS * torch.randn(x0.shape, generator=g).sign(), u)
    u = torch.where(pick > 0.95, x0, u)
    u = torch.minimum(torch.maximum(u, x0 - EPS), x0 + EPS).clamp(0, 1)
    return PoisonSet(idx, u, y[idx], _hash_clean(x[idx], y[idx]), EPS, 0.5, method, target, {"seed": seed})


def _vote(train, seeds=(1, 2, 3)) -> PoisonSet:
    return combine_poisons([_random_poison(train, s) for s in seeds], train, "vote")


def _header(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()["engine_poison"]), {k: fh.get_tensor(k) for k in fh.keys()}


def _rewrite(out, header, tensors, rehash=True):
    """Write ``tensors`` and ``header`` to ``out``; with ``rehash`` the file's sha256 matches its new contents."""
    from safetensors.torch import save_file

    header = dict(header)
    if rehash:
        header["sha256"] = _content_hash(tensors, {k: v for k, v in header.items() if k != "sha256"})
    save_file(tensors, str(out), metadata={"engine_poison": json.dumps(header)})
    return out


def test_int8_round_trip_is_bit_identical_within_eps_over_254(split, tmp_path):
    train, _ = split
    ps = _random_poison(train, 0)
    q = ps.encode(train, "int8")
    _invariants(q, train)
    assert q.encoding == "int8" and ps.encoding == "float32"
    err = (q.images.double() - ps.images.double()).abs()
    assert float(err.max()) <= EPS / 254 + 2**-24  # half a unit, plus float32 rounding of x0 + c * unit
    assert float(err.max()) > EPS / 254 * 0.9  # (the bound is nearly reached: the test can fail)
    at_bound = (ps.images - _originals(ps, train)).abs() == (q.images - _originals(ps, train)).abs()
    assert bool(at_bound.any())
    # a new poison: it records the float32 poison it was quantised from
    rec = q.settings["quantized"]
    assert rec["encoding"] == "int8" and rec["from"]["sha256"] == init_record(ps)["sha256"]
    assert rec["changed_pixels"] == int((err > 0).sum()) > 0 and rec["max_abs_change"] == float(err.max())
    assert init_record(q)["sha256"] != init_record(ps)["sha256"] and q.settings["seed"] == 0
    # the file decodes to the in-memory quantised poison, bit for bit
    q.save(tmp_path / "q.safetensors")
    back = PoisonSet.load(tmp_path / "q.safetensors", train)
    assert _same_bits(back.images, q.images) and back.encoding == "int8" and back.settings == q.settings
    assert torch.equal(back.indices, q.indices) and torch.equal(back.labels, q.labels)
    assert init_record(back) == init_record(q)
    header, tensors = _header(tmp_path / "q.safetensors")
    assert header["encoding"] == "int8" and header["poison_sha256"] == init_record(q)["sha256"]
    assert tensors["codes"].dtype == torch.int8 and int(tensors["codes"].abs().max()) == 127
    # decoding is x0 + codes * unit in float32, then the box and [0, 1]
    x0 = _originals(q, train)
    unit = _int8_scale(EPS)
    assert float(unit * 127) >= EPS and float(unit) <= EPS / 127 * (1 + 2**-22)
    manual = torch.minimum(torch.maximum(x0 + tensors["codes"].float() * unit, x0 - EPS), x0 + EPS).clamp(0, 1)
    assert _same_bits(manual, back.images)
    # encoding an int8 poison as int8 again is lossless: the same poison, and save / load again
    again = back.encode(train, "int8")
    assert _same_bits(again.images, q.images) and again.settings == q.settings
    back.save(tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "q.safetensors").read_bytes()
    # float32 of the quantised poison keeps its images and record
    f = q.encode(train, "float32")
    f.save(tmp_path / "f.safetensors")
    assert _same_bits(PoisonSet.load(tmp_path / "f.safetensors").images, q.images)
    assert init_record(PoisonSet.load(tmp_path / "f.safetensors")) == init_record(q)


def test_vote_poison_as_sign_and_int8_is_bit_identical(split, tmp_path):
    train, _ = split
    vote = _vote(train)
    s = vote.encode(train, "sign")
    assert _same_bits(s.images, vote.images)
    assert s.settings == vote.settings and "quantized" not in s.settings  # lossless: the same poison
    assert init_record(s) == init_record(vote)
    vote.save(tmp_path / "vote.safetensors")
    s.save(tmp_path / "vote.sign.safetensors")
    back = PoisonSet.load(tmp_path / "vote.sign.safetensors", train)
    old = PoisonSet.load(tmp_path / "vote.safetensors")
    assert _same_bits(back.images, old.images) and back.encoding == "sign"
    assert init_record(back)["sha256"] == init_record(old)["sha256"] == _header(tmp_path / "vote.safetensors")[0]["sha256"]
    assert back._meta() == old._meta()  # what evaluate_poison's victim digest reads
    _invariants(back, train)
    # the vertex pixels: x0 + eps or x0 - eps (then [0, 1]) or x0, and each kind is present
    x0 = _originals(vote, train)
    d = back.images - x0
    assert bool((d > 0).any()) and bool((d < 0).any()) and bool((d == 0).any())
    # int8 holds a vertex poison exactly too (codes +-127 reach the eps bound)
    i8 = vote.encode(train, "int8")
    assert _same_bits(i8.images, vote.images) and "quantized" not in i8.settings
    # the sign file of a vote poison reaches the vote again, and re-saving writes the same bytes
    back.save(tmp_path / "resaved.safetensors")
    assert (tmp_path / "resaved.safetensors").read_bytes() == (tmp_path / "vote.sign.safetensors").read_bytes()
    assert _same_bits(combine_poisons([back], train, "vote").images, vote.images)


def test_sign_refuses_a_poison_off_its_vertices_unless_snapped(split, tmp_path):
    train, _ = split
    ps = _random_poison(train, 4)
    with pytest.raises(PoisonError, match=r"sign encoding: \d+ of \d+ pixels are not at a vertex.*snap=True"):
        ps.encode(train, "sign")
    snapped = ps.encode(train, "sign", snap=True)
    assert _same_bits(snapped.images, combine_poisons([ps], train, "vote").images)  # the vote of that one poison
    rec = snapped.settings["quantized"]
    assert rec["encoding"] == "sign" and rec["snap"] is True and rec["from"]["sha256"] == init_record(ps)["sha256"]
    _invariants(snapped, train)
    snapped.save(tmp_path / "s.safetensors")
    assert _same_bits(PoisonSet.load(tmp_path / "s.safetensors", train).images, snapped.images)
    # one pixel off its vertex is enough to refuse; snap applies to sign only
    one = PoisonSet(snapped.indices, snapped.images.clone(), snapped.labels, snapped.clean_sha256, EPS, 0.5, "gaussian", 8)
    x0 = _originals(one, train)
    inside = ((x0 > 0.2) & (x0 < 0.8)).nonzero()[0]
    one.images[tuple(inside)] = x0[tuple(inside)] + EPS / 2
    with pytest.raises(PoisonError, match=r"1 of \d+ pixels are not at a vertex"):
        one.encode(train, "sign")
    with pytest.raises(ValueError, match="snap .* not for 'int8'"):
        one.encode(train, "int8", snap=True)


def test_refusals(split, tmp_path):
    train, _ = split
    q = _random_poison(train, 5).encode(train, "int8")
    q.save(tmp_path / "q.safetensors")
    s = _vote(train).encode(train, "sign")
    s.save(tmp_path / "s.safetensors")
    for name in ("q", "s"):  # a compact file without the training set, or with another one
        with pytest.raises(PoisonError, match="pass the training set it was crafted on"):
            PoisonSet.load(tmp_path / f"{name}.safetensors")
        other = (train[0].clone(), train[1])
        other[0][q.indices[3]] ^= 1
        with pytest.raises(PoisonError, match=f"{name}.safetensors: .*not the originals"):
            PoisonSet.load(tmp_path / f"{name}.safetensors", other)
    f32 = _random_poison(train, 5)
    f32.save(tmp_path / "f.safetensors")
    with pytest.raises(PoisonError, match="not the originals"):  # a float32 file is checked too when data is given
        PoisonSet.load(tmp_path / "f.safetensors", other)
    # tampered: codes, directions, metadata; a recorded sha256 that is not the decoded poison's
    header, tensors = _header(tmp_path / "q.safetensors")
    bad = {**tensors, "codes": tensors["codes"].clone()}
    bad["codes"][0, 0, 0, 0] = bad["codes"][0, 0, 0, 0] // 2 + 1
    with pytest.raises(PoisonError, match="sha256: the file was modified"):
        PoisonSet.load(_rewrite(tmp_path / "t1.safetensors", header, bad, rehash=False), train)
    with pytest.raises(PoisonError, match="decoded images are not those of the poison saved"):
        PoisonSet.load(_rewrite(tmp_path / "t2.safetensors", header, bad), train)
    bad["codes"][0, 0, 0, 0] = -128
    with pytest.raises(PoisonError, match=r"int8 codes must be .* in \[-127, 127\]"):
        PoisonSet.load(_rewrite(tmp_path / "t3.safetensors", header, bad), train)
    with pytest.raises(PoisonError, match="sha256: the file was modified"):
        PoisonSet.load(_rewrite(tmp_path / "t4.safetensors", {**header, "meta": {**header["meta"], "eps": 0.2}},
                                tensors, rehash=False), train)
    with pytest.raises(PoisonError, match="unknown poison encoding 'int4'"):
        PoisonSet.load(_rewrite(tmp_path / "t5.safetensors", {**header, "encoding": "int4"}, tensors), train)
    sheader, stensors = _header(tmp_path / "s.safetensors")
    bad = {**stensors, "directions": stensors["directions"].clone()}
    bad["directions"][0] ^= 1
    with pytest.raises(PoisonError, match="sha256: the file was modified"):
        PoisonSet.load(_rewrite(tmp_path / "t6.safetensors", sheader, bad, rehash=False), train)
    bad["directions"][0] = 0xFF  # code 3
    with pytest.raises(PoisonError, match="invalid 2-bit codes"):
        PoisonSet.load(_rewrite(tmp_path / "t7.safetensors", sheader, bad), train)
    # a header rewritten with a matching sha256 but malformed fields: one PoisonError, nothing allocated from it
    for i, (h, t, msg) in enumerate((
            ({k: v for k, v in header.items() if k != "image_shape"}, tensors, "image_shape None does not describe"),
            ({**header, "image_shape": "1,1,28,28"}, tensors, "image_shape '1,1,28,28' does not describe"),
            ({**header, "image_shape": [header["image_shape"][0], 10**6, 10**6, 1]}, tensors, "does not describe"),
            ({**sheader, "image_shape": [sheader["image_shape"][0], 1, 28, 29]}, stensors, "does not describe"),
            ({**header, "meta": {**header["meta"], "eps": "0.1"}}, tensors, "malformed: eps='0.1'"),
            ({**header, "meta": {k: v for k, v in header["meta"].items() if k != "target_class"}}, tensors,
             "malformed: target_class=None"))):
        with pytest.raises(PoisonError, match=msg):
            PoisonSet.load(_rewrite(tmp_path / f"h{i}.safetensors", h, t), train)
    # unknown encodings, as arguments
    with pytest.raises(ValueError, match="encoding must be one of"):
        q.encode(train, "int4")
    with pytest.raises(PoisonError, match="unknown poison encoding 'int4'"):
        PoisonSet(q.indices, q.images, q.labels, q.clean_sha256, EPS, 0.5, "gaussian", 8, {}, "int4")
    # save never changes a poison: a compact PoisonSet whose images its encoding does not hold is refused
    moved = PoisonSet.load(tmp_path / "q.safetensors", train)
    moved.images[0, 0, 14, 14] += 1e-4
    with pytest.raises(PoisonError, match="not exactly representable as int8 .*encode"):
        moved.save(tmp_path / "moved.safetensors")
    bare = PoisonSet(q.indices, q.images, q.labels, q.clean_sha256, EPS, 0.5, "gaussian", 8, {}, "sign")
    with pytest.raises(PoisonError, match="does not hold: make it with encode"):
        bare.save(tmp_path / "bare.safetensors")
    assert not (tmp_path / "moved.safetensors").exists() and not (tmp_path / "bare.safetensors").exists()
    # a poison outside its eps box is not encoded
    wide = PoisonSet(q.indices, (q.images + 0.05).clamp(0, 1), q.labels, q.clean_sha256, EPS, 0.5, "gaussian", 8)
    with pytest.raises(PoisonError, match="outside the eps box"):
        wide.encode(train, "int8")


def test_file_sizes(split, tmp_path):
    train, _ = split
    ps = _vote(train)
    ps.save(tmp_path / "f.safetensors")
    ps.encode(train, "int8").save(tmp_path / "i.safetensors")
    ps.encode(train, "sign").save(tmp_path / "s.safetensors")
    size = {k: (tmp_path / f"{k}.safetensors").stat().st_size for k in "fis"}
    pixels = ps.images.numel()
    assert pixels > 50_000
    assert pixels <= size["i"] < pixels * 1.1 and pixels / 4 <= size["s"] < pixels / 4 * 1.3
    assert 3.6 < size["f"] / size["i"] < 4 and 12 < size["f"] / size["s"] < 16


def test_read_poison_header_gives_the_identity_of_every_encoding_without_the_images(split, tmp_path):
    """read_poison_header reads a file's own account (meta, encoding, identity) without the training set: the
    identity is init_record's sha256 for float32, int8 and sign files alike; a file that is not a poison, or whose
    header has no identity, is refused by name."""
    train, _ = split
    ps = _vote(train)
    sha = init_record(ps)["sha256"]
    for enc in ("float32", "int8", "sign"):
        path = tmp_path / f"{enc}.safetensors"
        ps.encode(train, enc).save(path)
        head = read_poison_header(path)
        assert head["encoding"] == enc and head["sha256"] == sha and head["meta"] == ps._meta()
    other = _random_poison(train, 9)
    other.save(tmp_path / "other.safetensors")
    assert read_poison_header(tmp_path / "other.safetensors")["sha256"] == init_record(other)["sha256"] != sha
    header, tensors = _header(tmp_path / "int8.safetensors")
    _rewrite(tmp_path / "bad.safetensors", {k: v for k, v in header.items() if k != "poison_sha256"}, tensors)
    with pytest.raises(PoisonError, match="bad.safetensors: the poison metadata has no sha256"):
        read_poison_header(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PoisonError, match="junk.safetensors: not a readable safetensors file"):
        read_poison_header(tmp_path / "junk.safetensors")
    with pytest.raises(PoisonError, match="missing.safetensors: no such poison set"):
        read_poison_header(tmp_path / "missing.safetensors")


def test_old_float32_files_load_and_keep_their_sha256(split, tmp_path):
    """A float32 file as every earlier version wrote it: loads, and a float32 save today writes the same bytes."""
    from safetensors.torch import save_file

    train, _ = split
    ps = _random_poison(train, 6)
    meta = {"format": "engine.poison/1", "clean_sha256": ps.clean_sha256, "eps": ps.eps, "sigma": ps.sigma,
            "method": ps.method, "target_class": ps.target_class, "settings": ps.settings}
    tensors = {"indices": ps.indices.to(torch.int64), "images": ps.images, "labels": ps.labels.to(torch.int64)}
    save_file(tensors, str(tmp_path / "old.safetensors"),
              metadata={"engine_poison": json.dumps({"meta": meta, "sha256": _content_hash(tensors, meta)})})
    old = PoisonSet.load(tmp_path / "old.safetensors")
    assert _same_bits(old.images, ps.images) and old.encoding == "float32"
    assert init_record(old)["sha256"] == _content_hash(tensors, meta)  # the sha256 results cite
    ps.save(tmp_path / "new.safetensors")
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "old.safetensors").read_bytes()
    assert _same_bits(PoisonSet.load(tmp_path / "old.safetensors", train).images, ps.images)


def _tiny_mlp():
    from torch import nn

    from engine import models

    return nn.Sequential(models.Normalize(models.MNIST_MEAN, models.MNIST_STD), nn.Flatten(), nn.Linear(784, 16), nn.ReLU(),
                         nn.Linear(16, 10))


def test_poison_int8_is_the_crafted_poison_quantised_and_resumes(split, tmp_path):
    (x, y), (vx, vy) = split
    keep = torch.arange(400)
    train = (x[keep], y[keep])
    small = dict(target_class=8, method="gaussian", sigma=0.5, eps=EPS, batch_clean=40, batch_poison=10, batch_val=10, k=2,
                 niter1=3, niter2=1, lr_u=0.05, reset_every=0, seed=3)  # step 2 moves the poison
    ckpt = tmp_path / "ck"
    plain = poison(_tiny_mlp, train, (vx, vy), outer_steps=2, **small)
    assert plain.encoding == "float32" and "quantized" not in plain.settings
    poison(_tiny_mlp, train, (vx, vy), outer_steps=1, checkpoint=ckpt, checkpoint_every=1, encoding="int8", **small)
    q = poison(_tiny_mlp, train, (vx, vy), outer_steps=2, checkpoint=ckpt, checkpoint_every=1, encoding="int8", **small)
    assert q.encoding == "int8" and _same_bits(q.images, plain.encode(train, "int8").images)
    assert q.settings["quantized"]["changed_pixels"] > 0 and q.settings["outer_steps"] == 2
    from engine.pacd import _load_checkpoint

    assert _same_bits(_load_checkpoint(ckpt)[0]["u"], plain.images)  # the checkpoint keeps the float32 poison
    _invariants(q, train)
    q.save(tmp_path / "q.safetensors")
    assert _same_bits(PoisonSet.load(tmp_path / "q.safetensors", train).images, q.images)
    with pytest.raises(ValueError, match="encoding must be 'float32' or 'int8' for a crafted poison"):
        poison(_tiny_mlp, train, (vx, vy), outer_steps=1, encoding="sign", **small)


def test_cli_combine_encode_and_evaluate_compact_files(split, tmp_path, capsys):
    train, _ = split
    f = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        f[name] = tmp_path / f"{name}.safetensors"
        _random_poison(train, seed).save(f[name])
    common = ["--val-size", "9000"]
    vote = tmp_path / "vote.safetensors"
    assert cli.main(["poison-combine", str(f["a"]), str(f["b"]), str(f["c"]), *common, "--out", str(vote)]) == 0
    assert "sign, " in capsys.readouterr().out
    ps = PoisonSet.load(vote, train)
    assert ps.encoding == "sign" and _same_bits(ps.images, _vote(train).images)
    assert ps.settings["combine"] == "vote" and ps.settings["val_size"] == 9000
    mean = tmp_path / "mean.safetensors"
    assert cli.main(["poison-combine", str(f["a"]), str(f["b"]), "--how", "mean", *common, "--out", str(mean)]) == 0
    m = PoisonSet.load(mean, train)
    assert m.encoding == "int8" and m.settings["quantized"]["encoding"] == "int8"
    assert "int8 (quantised: " in capsys.readouterr().out
    # poison-combine reads a sign file: the vote of a vote poison is itself
    again = tmp_path / "again.safetensors"
    assert cli.main(["poison-combine", str(vote), *common, "--encoding", "float32", "--out", str(again)]) == 0
    assert _same_bits(PoisonSet.load(again).images, ps.images)
    # poison-encode: a vertex poison as sign is the same poison; an inside one is refused unless snapped
    enc = tmp_path / "enc.safetensors"
    assert cli.main(["poison-encode", str(again), "--encoding", "sign", *common, "--out", str(enc)]) == 0
    assert "as the same poison, sign" in capsys.readouterr().out
    assert _same_bits(PoisonSet.load(enc, train).images, ps.images)
    assert enc.read_bytes() != vote.read_bytes() and enc.stat().st_size * 12 < again.stat().st_size
    assert cli.main(["poison-encode", str(f["a"]), "--encoding", "sign", *common, "--out", str(tmp_path / "x")]) == 2
    assert "not at a vertex" in capsys.readouterr().err and not (tmp_path / "x").exists()
    snap = ["poison-encode", str(f["a"]), "--encoding", "sign", "--snap", *common, "--out", str(enc), "--overwrite"]
    assert cli.main(snap) == 0
    assert "as a new poison, sign" in capsys.readouterr().out
    assert _same_bits(PoisonSet.load(enc, train).images, combine_poisons([PoisonSet.load(f["a"])], train).images)
    assert cli.main(["poison-encode", str(f["a"]), "--encoding", "int8", "--snap", *common, "--out", str(enc),
                     "--overwrite"]) == 2
    assert cli.main(["poison-encode", str(f["a"]), "--encoding", "int8", *common, "--out", str(enc), "--overwrite"]) == 0
    assert PoisonSet.load(enc, train).settings["quantized"]["from"]["sha256"] == init_record(PoisonSet.load(f["a"]))["sha256"]
    assert cli.main(["poison-encode", str(vote), "--encoding", "int8", "--val-size", "8000", "--out", str(enc),
                     "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "vote.safetensors: " in err and "crafted from (it records dataset mnist, val_size 9000)" in err
    # evaluate trains a victim on the sign file's poison
    ev = ["evaluate", "--poison", str(vote), *common, "--victim-method", "gaussian", "--arch", "mlp", "--sigma", "0.5",
          "--epochs", "1", "--images", "2", "--n0", "10", "--n", "20", "--quiet", "--out-dir", str(tmp_path / "ev")]
    assert cli.main(ev) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["poisoned"] and summary["target_class"] == 8
    assert cli.main(ev[:3] + ["--val-size", "8000"] + ev[5:]) == 2  # another split: refused, naming the file
    assert "vote.safetensors" in capsys.readouterr().err
