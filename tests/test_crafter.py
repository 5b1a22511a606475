"""The PACD attack in parts: Crafter (step, state_dict / load_state_dict, result) against poison(), and PoisonConfig's
checks against poison()'s."""

import dataclasses

import pytest
import torch
from test_poison import SMALL, TARGET, _tiny_mlp

from engine.pacd import Crafter, PoisonConfig, PoisonError, poison, read_checkpoint
from engine.validate import InputError, InputTypeError

pytestmark = pytest.mark.filterwarnings(r"ignore:step \d+. the approxgrad solve")  # (tiny runs, untuned lr_p)

# PoisonConfig takes the crafting settings; the target class is the Crafter's
CONFIG = {k: v for k, v in SMALL.items() if k != "target_class"}
TIMING = ("seconds", "history_tail", "step_seconds_total")
SEED = 1  # (with this seed every step of these runs moves the poison: the solver and both Adam states take part)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _untimed(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in ("seconds", "phases")} for e in entries]


def _same_poison(a, b) -> None:
    assert torch.equal(_bits(a.images), _bits(b.images))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
    sa = {k: v for k, v in a.settings.items() if k not in TIMING}
    sb = {k: v for k, v in b.settings.items() if k not in TIMING}
    assert sa == sb
    assert _untimed(a.settings["history_tail"]) == _untimed(b.settings["history_tail"])


def _crafter(tiny, steps: int, **kw) -> Crafter:
    train, val = tiny
    seed = kw.pop("seed", SEED)
    return Crafter(_tiny_mlp, train, val, TARGET, PoisonConfig(outer_steps=steps, seed=seed, **{**CONFIG, **kw}))


@pytest.mark.parametrize("kw", [{}, {"reset_every": 1, "niter1": 1, "niter2": 1}], ids=["plain", "resets"])
def test_crafter_steps_equal_poison(tiny, kw):
    """N calls of step() give poison(outer_steps=N)'s poison bit for bit, its settings and its log entries."""
    train, val = tiny
    steps = 5 if kw else 3  # with resets: 4 outer steps an epoch, so step 5 re-initialises the lower model
    logged = []
    ps = poison(_tiny_mlp, train, val, outer_steps=steps, seed=SEED, log=logged.append, **{**SMALL, **kw})
    crafter = _crafter(tiny, steps, **kw)
    entries = [crafter.step() for _ in range(steps)]
    assert crafter.steps_done == steps and [e["step"] for e in entries] == list(range(1, steps + 1))
    assert _untimed(entries) == _untimed(logged) and crafter.history == entries
    assert kw or all(e["moved"] > 0 for e in entries)
    _same_poison(crafter.result(), ps)
    if kw:
        assert ps.settings["lower_resets"] == 1


def test_state_dict_resumes_bit_for_bit(tiny, tmp_path):
    """The state after 2 steps, loaded into a fresh Crafter and stepped once, equals 3 uninterrupted steps; the state is
    a snapshot (the Crafter it came from steps on without changing it) and survives a poisoning checkpoint file."""
    straight = _crafter(tiny, 3)
    for _ in range(3):
        straight.step()

    first = _crafter(tiny, 3)
    first.step()
    first.step()
    state = first.state_dict()
    assert state["step"] == 2 and state["u"].dtype == torch.float32 and state["p_adam"]["m"] is not None
    u_before = state["u"].clone()
    first.step()  # the snapshot does not move with its Crafter
    assert torch.equal(state["u"], u_before)
    assert torch.equal(_bits(first.result().images), _bits(straight.result().images))

    resumed = _crafter(tiny, 3)
    resumed.load_state_dict(state)
    assert resumed.steps_done == 2
    entry = resumed.step()
    assert entry["step"] == 3
    _same_poison(resumed.result(), straight.result())
    assert _untimed(resumed.history) == _untimed(straight.history)
    again = _crafter(tiny, 3)  # loading copies: the same state serves twice
    again.load_state_dict(state)
    again.step()
    assert torch.equal(_bits(again.result().images), _bits(straight.result().images))

    # the state a poisoning checkpoint holds is the Crafter's
    from engine.pacd.crafter import _state_from_checkpoint

    train, val = tiny
    ckpt = tmp_path / "run.ckpt"
    poison(_tiny_mlp, train, val, outer_steps=2, seed=SEED, checkpoint=ckpt, **SMALL)
    from_file = _crafter(tiny, 3)
    from_file.load_state_dict(_state_from_checkpoint(*read_checkpoint(ckpt)))
    from_file.step()
    _same_poison(from_file.result(), straight.result())


def test_load_state_dict_refuses_another_run(tiny):
    crafter = _crafter(tiny, 1)
    crafter.step()
    other = _crafter(tiny, 1, eps=0.2)
    with pytest.raises(PoisonError, match=r"state of a run with other settings \(eps differ\)"):
        other.load_state_dict(crafter.state_dict())


BAD = [
    ("method", "sgd", InputError, "method must be one of"),
    ("solver", "newton", InputError, "solver must be one of"),
    ("hvp_backend", "magic", InputError, "hvp_backend must be one of"),
    ("u_update", "momentum", InputError, "u_update must be 'adam' or 'sign'"),
    ("encoding", "sign", InputError, "encoding must be 'float32' or 'int8' for a crafted poison"),
    ("sigma", 0, ValueError, r"sigma must be a finite number > 0, got 0.0"),
    ("eps", float("nan"), ValueError, "eps must be a finite number > 0"),
    ("eps", 1.5, ValueError, r"eps must lie in \(0, 1\]"),
    ("lr_u", -1, ValueError, "lr_u must be a finite number > 0"),
    ("lr_w", 0.0, ValueError, "lr_w must be a finite number > 0"),
    ("lr_p", float("inf"), ValueError, "lr_p must be a finite number > 0"),
    ("damping", -0.1, ValueError, "damping must be a finite number >= 0"),
    ("outer_steps", -1, ValueError, "outer_steps must be an integer >= 0, got -1"),
    ("niter1", 1.5, ValueError, "niter1 must be an integer >= 0"),
    ("niter2", 0, ValueError, "niter2 must be an integer >= 1"),
    ("reset_every", True, ValueError, "reset_every must be an integer >= 0, got True"),
    ("checkpoint_every", 0, ValueError, "checkpoint_every must be an integer >= 1"),
    ("checkpoint_seconds", -1, ValueError, "checkpoint_seconds must be a finite number >= 0"),
    ("batch_clean", 0, ValueError, "batch_clean must be an integer >= 1"),
    ("batch_poison", 0, ValueError, "batch_poison must be an integer >= 1"),
    ("batch_val", 0, ValueError, "batch_val must be an integer >= 1"),
    ("k", 0, ValueError, "k must be an integer >= 1"),
    ("a", 0.5, InputError, r"a must lie in \[0, 0.5\)"),
    ("method_args", {"lbd": 1.0}, ValueError, "unknown arguments for method 'gaussian'"),
]


@pytest.mark.parametrize("name,value,error,match", BAD, ids=[b[0] for b in BAD])
def test_poison_config_refuses_what_poison_refuses(tiny, name, value, error, match):
    train, val = tiny
    base = {**CONFIG, "outer_steps": 1}
    with pytest.raises(error, match=match) as from_config:
        PoisonConfig(**{**base, name: value})
    with pytest.raises(error, match=match) as from_poison:
        poison(_tiny_mlp, train, val, **{**SMALL, "outer_steps": 1, name: value})
    assert type(from_config.value) is type(from_poison.value) and str(from_config.value) == str(from_poison.value)


def test_poison_config_values(tiny):
    cfg = PoisonConfig(sigma=1, eps=1, outer_steps=2.0, method="macer", method_args={"k": 3})
    assert cfg.sigma == 1.0 and isinstance(cfg.sigma, float) and cfg.eps == 1.0 and cfg.outer_steps == 2
    assert cfg.method_args == {"k": 3, "beta": 16.0, "gamma": 8.0, "lbd": 1.0}  # the procedure's defaults filled in
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sigma = 0.5
    assert dataclasses.replace(cfg, eps=0.1).eps == 0.1
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        dataclasses.replace(cfg, eps=0)
    assert PoisonConfig(sigma=0.5, eps=0.1, outer_steps=1, checkpoint_seconds=None).checkpoint_seconds is None
    with pytest.raises(TypeError):
        PoisonConfig(sigma=0.5, eps=0.1)  # outer_steps, as poison(), has no default
    train, val = tiny
    with pytest.raises(InputTypeError, match="config must be a PoisonConfig, got dict"):
        Crafter(_tiny_mlp, train, val, TARGET, {"sigma": 0.5})
    with pytest.raises(InputTypeError, match="poison takes a model factory"):
        Crafter(_tiny_mlp(), train, val, TARGET, PoisonConfig(sigma=0.5, eps=0.1, outer_steps=1))
    with pytest.raises(InputError, match="target_class must be >= 0"):
        Crafter(_tiny_mlp, train, val, -1, PoisonConfig(sigma=0.5, eps=0.1, outer_steps=1))


def test_lower_subset(tiny):
    """lower_subset: the lower level's clean pool is a seeded random part of the other classes' images (recorded in
    the settings), the poison is crafted as usual; more than there are is refused."""
    train, val = tiny
    cfg = PoisonConfig(**CONFIG, outer_steps=2, seed=SEED, lower_subset=50)
    crafter = Crafter(_tiny_mlp, train, val, TARGET, cfg)
    pool = crafter._pool_c
    assert pool.numel() == 50 and bool((train[1][pool] != TARGET).all()) and bool((pool.diff() > 0).all())
    again = Crafter(_tiny_mlp, train, val, TARGET, cfg)
    assert torch.equal(again._pool_c, pool)
    other = Crafter(_tiny_mlp, train, val, TARGET, dataclasses.replace(cfg, seed=SEED + 1))
    assert not torch.equal(other._pool_c, pool)
    crafter.step()
    crafter.step()
    ps = crafter.result()
    assert ps.settings["lower_subset"] == 50 and float((ps.images - train[0][ps.indices].float() / 255).abs().max()) > 0
    assert "lower_subset" not in Crafter(_tiny_mlp, train, val, TARGET, dataclasses.replace(cfg, lower_subset=None)).settings
    with pytest.raises(InputError, match="lower_subset 100000 is more than"):
        Crafter(_tiny_mlp, train, val, TARGET, dataclasses.replace(cfg, lower_subset=100000))
    with pytest.raises(InputError, match="lower_subset"):
        PoisonConfig(**CONFIG, outer_steps=2, lower_subset=0)


def test_data_parallel_refusals(tiny, monkeypatch):
    """Under a process group of 2 (faked): models with BatchNorm or Dropout, and steps that leave a rank without a
    validation row, are refused before any work."""
    from torch import nn

    from engine import distributed, models

    train, val = tiny
    monkeypatch.setattr(distributed, "world", lambda distributed=None: (0, 2))

    def with_bn():
        return nn.Sequential(models.Normalize(models.MNIST_MEAN, models.MNIST_STD), nn.Flatten(), nn.Linear(784, 16),
                             nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    with pytest.raises(InputError, match="BatchNorm"):
        Crafter(with_bn, train, val, TARGET, PoisonConfig(**CONFIG, outer_steps=1))

    def with_dropout():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 10))

    with pytest.raises(InputError, match="Dropout"):
        Crafter(with_dropout, train, val, TARGET, PoisonConfig(**CONFIG, outer_steps=1))
    one = int((val[1] == TARGET).nonzero()[0])  # a single validation image of the class: no share for rank 1
    keep = torch.tensor([i for i in range(val[1].numel()) if val[1][i] != TARGET or i == one])
    with pytest.raises(InputError, match="batch_val .*: 1 rows per step for 2 processes"):
        Crafter(_tiny_mlp, train, (val[0][keep], val[1][keep]), TARGET, PoisonConfig(**CONFIG, outer_steps=1))
