"""Compact poisoning checkpoints (engine.pacd.compact): what they keep, how close the expansion is, that a run
resumes from it, and that a wrong file or training set is refused by name."""

import lzma

import pytest
import torch
from torch import nn

from engine import models
from engine.pacd import (
    PoisonError,
    compact_checkpoint,
    expand_checkpoint,
    poison,
    read_checkpoint,
    read_compact_checkpoint,
)

TARGET = 3
SMALL = dict(target_class=TARGET, method="gaussian", sigma=0.5, eps=0.1, batch_clean=60, batch_poison=20, batch_val=20,
             k=4, niter1=3, niter2=3, lr_u=0.05, reset_every=0)


def _tiny_mlp():
    return nn.Sequential(models.Normalize(models.MNIST_MEAN, models.MNIST_STD), nn.Flatten(), nn.Linear(784, 32), nn.ReLU(),
                         nn.Linear(32, 10))


@pytest.fixture(scope="module")
def crafted(tiny, tmp_path_factory):
    train, val = tiny
    ckpt = tmp_path_factory.mktemp("compact") / "ck.safetensors"
    poison(_tiny_mlp, train, val, outer_steps=5, checkpoint=ckpt, checkpoint_every=1, seed=3, **SMALL)  # (the upper
    return ckpt  # objective is 0 for 3 steps here, and the poison moves from step 4)


def test_expansion_keeps_the_state_within_its_stated_precision(tiny, crafted, tmp_path):
    train, _ = tiny
    info = compact_checkpoint(crafted, train, tmp_path / "c.xz")
    assert info["step"] == 5 and 0 < info["bytes"] < info["checkpoint_bytes"]
    assert info["bytes"] == (tmp_path / "c.xz").stat().st_size
    got = expand_checkpoint(tmp_path / "c.xz", train, tmp_path / "e.safetensors")
    assert got == {"step": 5, "reset_index": 0}
    (a, meta_a), (b, meta_b) = read_checkpoint(crafted), read_checkpoint(tmp_path / "e.safetensors")
    assert meta_a == meta_b and sorted(a) == sorted(b)
    eps = SMALL["eps"]
    x0 = train[0][(train[1] == TARGET).nonzero().flatten()].float().reshape(a["u"].shape) / 255
    # the poison: its int8 codes' images, within half a unit (eps/254) of it, inside the box and [0, 1]
    assert float((b["u"] - a["u"]).abs().max()) <= eps / 254 * (1 + 1e-4) + 1e-7
    assert float((b["u"] - x0).abs().max()) <= eps + 1e-6 and 0 <= float(b["u"].min()) and float(b["u"].max()) <= 1
    assert float((a["u"] - x0).abs().max()) > 0.5 * SMALL["lr_u"]  # it has moved: the check above is not vacuous
    moments = [k for k in a if k in ("u_m", "u_v", "p_m", "p_v") or k.endswith(("/exp_avg", "/exp_avg_sq"))]
    assert {"u_m", "u_v", "p_m", "p_v"} <= set(moments) and len(moments) >= 6
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if k in moments:  # bfloat16: 8 significant bits, round to nearest
            err = (b[k].double() - a[k].double()).abs()
            assert bool((err <= a[k].double().abs() * 2.0**-8).all()), k
            assert bool(((a[k] == 0) == (b[k] == 0)).all()) and bool((torch.sign(a[k]) == torch.sign(b[k])).all()), k
        elif k != "u":  # the weights, the solver's warm start, the step counts: as they are
            assert torch.equal(a[k], b[k]), k
    stored, how = read_compact_checkpoint(tmp_path / "c.xz")
    assert stored["u_codes"].dtype == torch.int8 and "u" not in stored
    assert set(how["bfloat16"]) == set(moments) and how["checkpoint"]["step"] == 5


def test_a_run_resumes_from_the_expanded_checkpoint(tiny, crafted, tmp_path):
    train, val = tiny
    compact_checkpoint(crafted, train, tmp_path / "c.xz")
    ckpt = tmp_path / "resumed.safetensors"
    expand_checkpoint(tmp_path / "c.xz", train, ckpt)
    logged = []
    resumed = poison(_tiny_mlp, train, val, outer_steps=7, checkpoint=ckpt, checkpoint_every=1, seed=3,
                     log=lambda e: logged.append(e["step"]), **SMALL)
    assert logged == [6, 7]  # resumed after step 5, not started again
    straight = poison(_tiny_mlp, train, val, outer_steps=7, seed=3, **SMALL)
    history = read_checkpoint(crafted)[1]["history"]
    assert read_checkpoint(ckpt)[1]["step"] == 7
    assert resumed.settings["upper_by_step"][:5] == \
        [round(float(e["upper"]), 6) for e in history]  # the steps before the compact copy are the original run's
    x0 = train[0][resumed.indices].float() / 255
    assert float((resumed.images - x0).abs().max()) <= SMALL["eps"] + 1e-6
    # two more steps from a state rounded once: near the uninterrupted run, not necessarily equal to it
    assert float((resumed.images - straight.images).abs().max()) <= SMALL["eps"]


def test_wrong_files_and_training_sets_are_refused_by_name(tiny, crafted, tmp_path):
    train, _ = tiny
    out = tmp_path / "c.xz"
    images = train[0].clone()
    images[(train[1] == TARGET).nonzero()[0, 0], 0, 14, 14] ^= 1  # one pixel of one original changed
    other = (images, train[1])
    with pytest.raises(PoisonError, match="not the originals this run poisons"):
        compact_checkpoint(crafted, other, out)
    assert not out.exists()
    compact_checkpoint(crafted, train, out)
    with pytest.raises(PoisonError, match="not the originals this run poisons"):
        expand_checkpoint(out, other, tmp_path / "e.safetensors")
    assert not (tmp_path / "e.safetensors").exists()
    with pytest.raises(PoisonError, match=r"plain\.safetensors: not a compact poisoning checkpoint"):
        expand_checkpoint(_copy(crafted, tmp_path / "plain.safetensors"), train, tmp_path / "e.safetensors")
    cut = tmp_path / "cut.xz"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(PoisonError, match=r"cut\.xz: not a compact poisoning checkpoint"):
        read_compact_checkpoint(cut)
    alien = tmp_path / "alien.xz"  # LZMA of a poisoning checkpoint (another metadata entry)
    alien.write_bytes(lzma.compress(crafted.read_bytes()))
    with pytest.raises(PoisonError, match=r"alien\.xz: not a compact poisoning checkpoint"):
        read_compact_checkpoint(alien)
    with pytest.raises(PoisonError, match=r"missing\.xz: no such compact"):
        read_compact_checkpoint(tmp_path / "missing.xz")
    torn = tmp_path / "torn.xz"  # LZMA intact, the safetensors inside it cut short
    torn.write_bytes(lzma.compress(lzma.decompress(out.read_bytes())[:-1000]))
    with pytest.raises(PoisonError, match=r"torn\.xz: not a compact poisoning checkpoint"):
        read_compact_checkpoint(torn)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(tmp_path / "other.safetensors"))  # compacting what is no poisoning checkpoint
    with pytest.raises(PoisonError, match=r"other\.safetensors"):
        compact_checkpoint(tmp_path / "other.safetensors", train, tmp_path / "d.xz")
    assert not (tmp_path / "d.xz").exists() and not list(tmp_path.glob("*.tmp"))


def _copy(src, dest):
    dest.write_bytes(src.read_bytes())
    return dest
