"""Evaluation of poisons: train victims from scratch, certify the target class, compare with clean.

:func:`evaluate_poison` trains one victim (architecture x training procedure) on clean or poisoned
data, certifies a fixed random sample of test images of the target class (Cohen et al.'s CERTIFY,
by default n0 100, n 100,000, alpha 0.001) and reports ACR, certified accuracy at radii and the clean
accuracy on the other classes. Everything is resumable: a victim already trained with the same
settings is reloaded, an interrupted victim training continues from its checkpoint (every epoch and
every ``train_checkpoint_seconds`` inside one; the same weights as an uninterrupted run), and the
certification log resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import models
from .fileio import publish, sha256_file
from .pacd import PoisonSet, derive_seed
from .validate import InputError, InputTypeError, check_dataset, check_device, check_model_fits, check_progress

__all__ = ["evaluate_poison", "target_test_indices", "acr_drop", "acr_drop_interval", "pair_evaluations", "format_rows",
           "RADII"]

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def target_test_indices(test_labels: torch.Tensor, target_class: int, count: int, seed: int = 0) -> list[int]:
    """``count`` random test indices of ``target_class`` (sorted), the same for every victim given ``seed``."""
    pool = (torch.as_tensor(test_labels) == target_class).nonzero().flatten()
    if pool.numel() == 0:
        raise ValueError(f"no test images of class {target_class}")
    g = torch.Generator().manual_seed(derive_seed(seed, target_class, 77))
    chosen = pool[torch.randperm(pool.numel(), generator=g)[: min(count, pool.numel())]]
    return sorted(int(i) for i in chosen)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


_CERT_FILES = ("certify.tsv", "certify.json", "certify.png", "summary.json")


def _set_aside(out_dir: Path, names, victim: str, why: str) -> None:
    """Move the files ``names`` of ``out_dir`` (those present) into ``out_dir/superseded/<victim>``
    (a fresh folder each time), with a RuntimeWarning: results of another victim are kept, not mixed
    with the new ones nor overwritten."""
    present = [n for n in names if (out_dir / n).exists()]
    if not present:
        return
    dest = out_dir / "superseded" / victim
    k = 1
    while dest.exists():
        k += 1
        dest = out_dir / "superseded" / f"{victim}-{k}"
    dest.mkdir(parents=True)
    for n in present:
        os.replace(out_dir / n, dest / n)
    warnings.warn(f"{out_dir}: {why}; its {', '.join(present)} moved to {dest}", RuntimeWarning, stacklevel=3)


def _certified_victim(out_dir: Path) -> str | None:
    """The victim digest the certification log in ``out_dir`` was written for (None: no readable one)."""
    try:
        return json.loads((out_dir / "certify.json").read_text())["settings"]["victim"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@torch.no_grad()
def _accuracy(model, images, labels, device, batch_size=2000) -> float:
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        x = (x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)).to(device)
        correct += int((model(x).argmax(1).cpu() == labels[i : i + batch_size]).sum())
    return correct / max(1, images.shape[0])


def _no_progress(info: dict) -> None:
    """The ``progress`` callback of a victim trained without a bar."""


def _train_victim(arch, device, train_ckpt: Path, progress: bool, checkpoint_seconds, data, init_state=None,
                  **train_args):
    """Build the victim (init from ``train_args["seed"]``, or the weights ``init_state``) and train it with a
    resumable checkpoint at ``train_ckpt``.

    Returns (model, history, train_seconds); train_seconds sums the epochs' training time when the run
    resumed (the wall time of earlier calls is not known), else it is this call's wall time.
    """
    import warnings

    from .models import CheckpointError
    from .train import train

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(train_args["seed"], 5))
            model = models.build(arch)
            if init_state is not None:
                model.load_state_dict(init_state, strict=True)
            return model.to(device)

    callback, close_bar = (_no_progress, lambda: None)  # (None would be train's default: a bar on a terminal)
    if progress:
        from .train import progress_bar

        callback, close_bar = progress_bar(data[0].shape[0], f"train[{train_args['method']}/{arch}] ")

    def run(resume: bool):
        return train(build(), data, checkpoint=train_ckpt, resume=resume, checkpoint_seconds=checkpoint_seconds,
                     progress=callback, **train_args)

    resumed = train_ckpt.exists()
    t0 = time.perf_counter()
    try:
        model, history = run(resume=True)
    except CheckpointError as exc:
        if not resumed:
            raise
        warnings.warn(f"{train_ckpt}: not resumed, training the victim again ({exc})", RuntimeWarning, stacklevel=3)
        resumed = False
        t0 = time.perf_counter()
        model, history = run(resume=False)
    finally:
        close_bar()
    seconds = time.perf_counter() - t0
    if resumed:
        seconds = float(sum(h.get("seconds", 0.0) for h in history))
    return model, history, seconds


def _check_victim_fits(arch: str, train_data, test_data, target: int) -> None:
    """Build a victim of ``arch`` (CPU, the global RNG untouched) and run it once on a training image: an
    architecture that does not take the images, or has no output for a label or the target class, is refused
    before any victim is looked for, trained or certified."""
    with torch.random.fork_rng(devices=[]):
        probe = models.build(arch)
    name = f"victim architecture {arch!r}"
    classes = check_model_fits(probe, train_data[0], name=name, labels=train_data[1], labels_name="train_data labels")
    if tuple(test_data[0].shape[1:]) != tuple(train_data[0].shape[1:]):
        raise InputError(f"test_data images are {tuple(test_data[0].shape[1:])} but the training images "
                         f"{tuple(train_data[0].shape[1:])}")
    top = int(test_data[1].max())
    if top >= classes:
        raise InputError(f"test_data labels go up to {top} but the {name} has {classes} outputs (classes 0..{classes - 1})")
    if target < 0 or target >= classes:
        raise InputError(f"target_class {target} is not a class of the {name}: it has {classes} outputs "
                         f"(classes 0..{classes - 1})")


def evaluate_poison(
    poison_set: PoisonSet | None,
    train_data,
    test_data,
    *,
    victim_method: str,
    arch: str = "lenet",
    sigma: float,
    target_class: int | None = None,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 0.01,
    optimizer: str = "sgd",
    schedule: str = "cosine",
    seed: int = 0,
    method_args: dict | None = None,
    n_images: int = 500,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch: int | None = None,
    out_dir: str | os.PathLike,
    reuse_victims_from=(),
    init_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    train_checkpoint_seconds: float | None = 300.0,
    dataset: str | None = None,
) -> dict:
    """Train a victim on clean (``poison_set=None``) or poisoned data and certify the target class.

    Args:
        poison_set: the poison, applied to ``train_data`` (None: clean victim; then ``target_class``).
        train_data, test_data: (images (N, C, H, W) uint8, labels (N,)).
        victim_method: training procedure of the victim ("gaussian", "macer", "smoothadv", "standard");
            ``method_args`` are passed to :func:`engine.train`.
        arch: victim architecture (engine.models.build name: lenet, mlp, resnet20, ...).
        sigma: noise level of training and certification.
        dataset: the data set's name, for the plot's title and the summary's trace only (e.g. "mnist").
        n_images: random test images of the target class to certify (same ones for every victim).
        out_dir: the victim checkpoint, certification log (certify.tsv/.json/.png) and summary.json.
            A victim or certification found there of other settings (e.g. of an earlier version of the
            poison) is moved into ``out_dir/superseded/<its victim digest>/`` with a RuntimeWarning.
        reuse_victims_from: other evaluation directories; a victim there trained with exactly these
            settings (architecture, procedure and its arguments, epochs, optimiser, seed, data and poison)
            is copied into ``out_dir`` instead of training another (e.g. the transfer matrix reusing the
            main table's victims, certified again with other images or n).
        init_weights: start the victim from the weights in this file (read by :func:`engine.models.load`
            with ``arch``: an engine checkpoint, a safetensors file or a PyTorch state_dict) instead of a
            random initialisation; the file's sha256 joins the victim settings (``init_weights_sha256``),
            so a victim, training checkpoint or reused victim of other starting weights is not taken.
        progress: progress bars for the victim's training (batches) and the certification (images): None
            (default) only when stderr is a terminal (never under pytest or in a log file), True always,
            False never.
        train_checkpoint_seconds: while a victim trains, ``out_dir/victim.train.ckpt`` is written after
            every epoch and this often inside one (None: epochs only); a later call with the same
            settings resumes from it (a checkpoint of other settings is replaced, with a warning) and
            it is removed once the victim is saved.

    Raises:
        :class:`engine.validate.InputError` (a ValueError) for bad data (as for :func:`engine.train`; the
        test images must be uint8), a victim architecture that does not take the images (its model is
        built and run once on a training image first) or labels / ``target_class`` beyond its outputs.

    Returns:
        dict with acr, certified_accuracy (at :data:`RADII`), clean accuracy of the base classifier on
        the other classes and on the target class, abstain rate, training time, settings.
    """
    from .certification import certify_dataset
    from .pacd import _poison_sha256
    from .plots import title_for
    from .results import SCHEMA_VERSION, run_trace

    if poison_set is not None and not isinstance(poison_set, PoisonSet):
        raise InputTypeError(f"poison_set must be a PoisonSet (engine.pacd.PoisonSet.load(path, train_data)) or None, "
                             f"got {type(poison_set).__name__}")
    if poison_set is None and target_class is None:
        raise InputError("a clean evaluation needs target_class")
    target = poison_set.target_class if poison_set is not None else int(target_class)
    if poison_set is not None and target_class is not None and int(target_class) != target:
        raise InputError(f"target_class {target_class} differs from the poison's {target}")
    progress = check_progress(progress, allow_callable=False)
    train_data = check_dataset(train_data, "train_data")
    test_data = check_dataset(test_data, "test_data")
    if test_data[0].dtype != torch.uint8:
        raise InputError(f"test_data images must be uint8 (0..255) as loaded by engine.data, got {test_data[0].dtype}")
    _check_victim_fits(arch, train_data, test_data, target)
    device = check_device(device)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"out_dir {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    test_x, test_y = test_data
    if poison_set is not None:
        train_x, train_y = poison_set.apply(train_data)
        data_tag = {"poison_sha256": _digest(poison_set._meta()), "poison_method": poison_set.method}
    else:
        train_x, train_y = train_data
        data_tag = {"poison_sha256": None, "poison_method": None}
    train_settings = {
        "arch": arch,
        "victim_method": victim_method,
        "sigma": float(sigma),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "optimizer": optimizer,
        "schedule": schedule,
        "seed": int(seed),
        "method_args": dict(method_args or {}),
        "train_size": int(train_x.shape[0]),
        **data_tag,
    }
    init_state = None
    if init_weights is not None:  # read (and checked against arch) now, before any victim is looked for
        init_state = models.load(init_weights, arch=arch).state_dict()
        train_settings["init_weights_sha256"] = sha256_file(init_weights)
    ckpt = out_dir / "victim.safetensors"
    model = None
    train_seconds = None
    wanted = json.loads(json.dumps(train_settings))
    digest = _digest(train_settings)
    if ckpt.exists():  # a victim of other settings (e.g. of an earlier poison) is kept, with its results
        try:
            stored = models.read_meta(ckpt)["meta"].get("train_settings")
            old = _digest(stored)
        except Exception:  # unreadable: not overwritten either
            stored, old = None, "unreadable"
        if stored != wanted:
            stale = ["victim.safetensors"] + (list(_CERT_FILES) if _certified_victim(out_dir) in (old, None) else [])
            _set_aside(out_dir, stale, old, "the victim there was trained with other settings")
    # a victim still in out_dir has these settings (any other was set aside above); without one, a victim
    # trained with them elsewhere is copied in
    if not ckpt.exists():
        for source in (Path(d) / "victim.safetensors" for d in reuse_victims_from):
            if source.exists() and models.read_meta(source)["meta"].get("train_settings") == wanted:
                tmp = ckpt.with_name(ckpt.name + ".tmp")
                shutil.copyfile(source, tmp)
                publish(tmp, ckpt)
                break
    if ckpt.exists():
        model = models.load(ckpt, device=device)
        train_seconds = model.engine_meta["meta"].get("train_seconds")
    if model is None:
        train_ckpt = out_dir / "victim.train.ckpt"
        model, history, train_seconds = _train_victim(
            arch, device, train_ckpt, progress, train_checkpoint_seconds,
            (train_x, train_y), init_state=init_state,
            **({} if init_state is None else {"init_weights": train_settings["init_weights_sha256"]}),
            method=victim_method, sigma=sigma, epochs=epochs, batch_size=batch_size, lr=lr,
            optimizer=optimizer, schedule=schedule, seed=seed, **dict(method_args or {}),
        )
        models.save(model, ckpt, train_settings=train_settings, history=history, train_seconds=train_seconds)
        train_ckpt.unlink(missing_ok=True)
    model.eval()
    certified = _certified_victim(out_dir)
    if certified is not None and certified != digest:  # results of another victim (its weights already gone)
        _set_aside(out_dir, _CERT_FILES, certified, "the certification there is of another victim")
    indices = target_test_indices(test_y, target, n_images, seed=0)
    cert_settings = {
        "victim": digest,
        "target_class": target,
        "sigma": float(sigma),
        "n0": n0,
        "n": n,
        "alpha": alpha,
        "images": len(indices),
        "certify_seed": 0,
    }
    which = "poisoned" if poison_set is not None else "clean"
    trace = {"command": "evaluate", "dataset": dataset, "device": str(device), "threads": torch.get_num_threads(),
             **({} if poison_set is None else {"poison_content_sha256": _poison_sha256(poison_set)})}
    summ = certify_dataset(
        model,
        (test_x, test_y),
        sigma=sigma,
        n0=n0,
        n=n,
        alpha=alpha,
        out=out_dir / "certify.tsv",
        indices=indices,
        settings=cert_settings,
        batch_size=batch,
        seed=0,
        progress=progress,
        title=title_for({"dataset": dataset, "split": "test", "sigma": float(sigma), "n": n, "alpha": alpha},
                        len(indices), f"class {target}, {victim_method} victim on {which} data"),
        trace=trace,
    ).summary
    others = test_y != target
    result = {
        "target_class": target,
        "victim_method": victim_method,
        "arch": arch,
        "sigma": float(sigma),
        "poisoned": poison_set is not None,
        "poison_method": data_tag["poison_method"],
        "images": summ["images"],
        "acr": summ["acr"],
        "certified_accuracy": summ["certified_accuracy"],
        "abstain_rate": summ["abstain_rate"],
        "smoothed_accuracy_target": summ["clean_accuracy"],
        "clean_accuracy_other_classes": _accuracy(model, test_x[others], test_y[others], device),
        "clean_accuracy_target": _accuracy(model, test_x[~others], test_y[~others], device),
        "train_seconds": train_seconds,
        "certify_seconds": summ.get("seconds_total"),
        "n0": n0,
        "n": n,
        "alpha": alpha,
        "train_settings": train_settings,
    }
    if init_weights is not None:
        result["init_weights"] = str(init_weights)
    result["schema_version"] = SCHEMA_VERSION
    result["trace"] = run_trace(**trace)
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    publish(tmp, out_dir / "summary.json")
    return result


def acr_drop(clean: dict, poisoned: dict) -> float:
    """Relative ACR drop (clean - poisoned) / clean."""
    return (clean["acr"] - poisoned["acr"]) / clean["acr"] if clean["acr"] > 0 else float("nan")


def acr_drop_interval(clean_log, poisoned_log, *, level: float = 0.95, reps: int = 10_000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(drop, low, high): the relative ACR drop between two certification logs of the same images and its
    paired bootstrap percentile interval at ``level``.

    Each image's certified radius (0 when wrong or abstained) is paired across the two victims; the
    images are resampled with replacement ``reps`` times (numpy generator ``seed``) and the drop
    1 - sum(poisoned) / sum(clean) recomputed. The interval covers the sampling of test images (and the
    Monte Carlo noise of each radius), not the randomness of training the victims.
    """
    from .results import read_log

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if int(reps) < 1:
        raise ValueError(f"reps must be >= 1, got {reps!r}")
    rows_c, rows_p = read_log(clean_log)[1], read_log(poisoned_log)[1]
    if set(rows_c) != set(rows_p):
        only_c, only_p = sorted(set(rows_c) - set(rows_p)), sorted(set(rows_p) - set(rows_c))
        raise ValueError(f"the logs certify different images: {len(only_c)} only in {clean_log} (e.g. {only_c[:3]}), "
                         f"{len(only_p)} only in {poisoned_log} (e.g. {only_p[:3]})")
    if not rows_c:
        raise ValueError(f"{clean_log} has no certified images")
    keys = sorted(rows_c)
    r_c = np.array([rows_c[k][3] * rows_c[k][4] for k in keys])
    r_p = np.array([rows_p[k][3] * rows_p[k][4] for k in keys])
    if r_c.sum() <= 0:
        return float("nan"), float("nan"), float("nan")
    pick = np.random.default_rng(seed).integers(0, len(keys), size=(int(reps), len(keys)))
    sums_c = r_c[pick].sum(1)
    drops = 1 - r_p[pick].sum(1) / np.where(sums_c > 0, sums_c, np.nan)
    lo, hi = np.nanpercentile(drops, [50 * (1 - level), 50 * (1 + level)])
    return float(1 - r_p.sum() / r_c.sum()), float(lo), float(hi)


def pair_evaluations(clean_dir, poisoned_dir) -> dict:
    """One clean / poisoned pair of evaluation directories (``evaluate_poison(out_dir=...)``) side by side: their
    ACRs from ``summary.json``, the relative drop and its paired 95% interval over the certified images of their
    ``certify.tsv`` (:func:`acr_drop_interval`). ValueError names the directory that is not a finished evaluation,
    sides given the wrong way round, or logs of different images."""
    clean_dir, poisoned_dir = Path(clean_dir), Path(poisoned_dir)
    summaries = []
    for directory in (clean_dir, poisoned_dir):
        path = directory / "summary.json"
        if not path.is_file():
            raise ValueError(f"{directory} holds no summary.json: not a finished evaluation directory")
        try:
            summary = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(summary, dict) or not isinstance(summary.get("poisoned"), bool):
            raise ValueError(f"{path} does not say whether its victim was poisoned (no boolean 'poisoned'): "
                             f"not an engine evaluation summary")
        if not isinstance(summary.get("acr"), (int, float)) or isinstance(summary.get("acr"), bool):
            raise ValueError(f"{path} holds no numeric 'acr': not a finished engine evaluation summary")
        summaries.append(summary)
    clean, bad = summaries
    if clean["poisoned"] or not bad["poisoned"]:
        raise ValueError(f"expected a clean victim in {clean_dir} and a poisoned one in {poisoned_dir}, "
                         f"got poisoned={clean['poisoned']} / {bad['poisoned']}")
    _, lo, hi = acr_drop_interval(clean_dir / "certify.tsv", poisoned_dir / "certify.tsv")
    return {"clean_dir": str(clean_dir), "poisoned_dir": str(poisoned_dir), "acr_clean": clean["acr"],
            "acr_poisoned": bad["acr"], "acr_drop": acr_drop(clean, bad), "acr_drop_interval_95": [lo, hi],
            "clean": clean, "poisoned": bad}


def _radii(log) -> dict[int, float]:
    from .results import read_log

    return {k: r[3] * r[4] for k, r in read_log(log)[1].items()}  # radius of a correct prediction, else 0


def drop_difference_interval(clean_log, poisoned_log, control_log, *, level: float = 0.95, reps: int = 10_000,
                             seed: int = 0) -> tuple[float, float, float]:
    """(difference, low, high): the poison's relative ACR drop minus a control's, (sum r_control - sum r_poisoned)
    / sum r_clean over the same images, and its paired bootstrap percentile interval at ``level`` (images
    resampled with replacement ``reps`` times, numpy generator ``seed``; as :func:`acr_drop_interval`, the interval
    covers the test images, not the training of the victims). Positive: the poison lowers the ACR more."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    logs = {"clean": clean_log, "poisoned": poisoned_log, "control": control_log}
    radii = {k: _radii(v) for k, v in logs.items()}
    keys = sorted(radii["clean"])
    for name, r in radii.items():
        if set(r) != set(keys):
            raise ValueError(f"the {name} log {logs[name]} certifies other images than the clean log {clean_log}")
    if not keys:
        raise ValueError(f"{clean_log} has no certified images")
    c, p, k = (np.array([radii[n][i] for i in keys]) for n in ("clean", "poisoned", "control"))
    if c.sum() <= 0:
        return float("nan"), float("nan"), float("nan")
    pick = np.random.default_rng(seed).integers(0, len(keys), size=(int(reps), len(keys)))
    sums_c = c[pick].sum(1)
    diffs = (k[pick].sum(1) - p[pick].sum(1)) / np.where(sums_c > 0, sums_c, np.nan)
    lo, hi = np.nanpercentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    return float((k.sum() - p.sum()) / c.sum()), float(lo), float(hi)


def control_differences(clean_dir, poisoned_dir, control_dirs: dict) -> list[dict]:
    """For each control (name -> its evaluation directory): the poison's and the control's ACR drops against the
    clean victim and their difference with its paired 95% interval (:func:`drop_difference_interval`)."""
    clean_dir, poisoned_dir = Path(clean_dir), Path(poisoned_dir)
    pair = pair_evaluations(clean_dir, poisoned_dir)
    rows = []
    for name, directory in control_dirs.items():
        ctrl = pair_evaluations(clean_dir, directory)
        diff, lo, hi = drop_difference_interval(clean_dir / "certify.tsv", poisoned_dir / "certify.tsv",
                                                Path(directory) / "certify.tsv")
        rows.append({"control": name, "control_dir": str(directory), "acr_clean": pair["acr_clean"],
                     "acr_poisoned": pair["acr_poisoned"], "acr_control": ctrl["acr_poisoned"],
                     "drop_poisoned": pair["acr_drop"], "drop_control": ctrl["acr_drop"],
                     "drop_minus_control": diff, "drop_minus_control_ci95": [lo, hi],
                     "clean_acc_target_poisoned": pair["poisoned"].get("clean_accuracy_target"),
                     "clean_acc_target_control": ctrl["poisoned"].get("clean_accuracy_target")})
    return rows


def format_control_differences(rows: list[dict]) -> str:
    """Markdown table of :func:`control_differences`: the poison against each control."""
    def pct(v):
        return "-" if v is None or v != v else f"{100 * v:.1f}%"

    def acc(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| control | ACR drop poison | ACR drop control | poison minus control | 95% interval "
             "| target clean acc poison / control |", "|" + "---|" * 6]
    for r in rows:
        lo, hi = r["drop_minus_control_ci95"]
        lines.append(f"| {r['control']} | {pct(r['drop_poisoned'])} | {pct(r['drop_control'])} | "
                     f"{pct(r['drop_minus_control'])} | [{pct(lo)}, {pct(hi)}] | "
                     f"{acc(r['clean_acc_target_poisoned'])} / {acc(r['clean_acc_target_control'])} |")
    return "\n".join(lines)


def evaluate_with_controls(poison_set: PoisonSet, train_data, test_data, *, out_dir, controls=("twin", "vertex"),
                           control_seed: int = 0, **kwargs) -> dict:
    """:func:`evaluate_poison` of a poison and, beside it, of random controls of the same images
    (:func:`engine.pacd.random_poison` with ``like=poison_set``, seed ``control_seed``), each with the same victim
    settings (``kwargs``), in ``out_dir`` and ``out_dir/controls/<kind>-seed<s>``. Returns {"poisoned": result,
    "controls": {kind: result}, "control_dirs": {kind: dir}}. Each evaluation resumes on its own."""
    from .pacd import CONTROLS, random_poison

    controls = tuple(controls)
    bad = [c for c in controls if c not in CONTROLS]
    if bad:
        raise InputError(f"unknown controls {bad}; known: {', '.join(CONTROLS)}")
    if not isinstance(poison_set, PoisonSet):
        raise InputError(f"poison_set must be a PoisonSet, got {type(poison_set).__name__}")
    out_dir = Path(out_dir)
    result = {"poisoned": evaluate_poison(poison_set, train_data, test_data, out_dir=out_dir, **kwargs),
              "controls": {}, "control_dirs": {}}
    for kind in controls:
        ctrl = random_poison(train_data, target_class=poison_set.target_class, eps=poison_set.eps, kind=kind,
                             seed=control_seed, like=poison_set)
        ctrl_dir = out_dir / "controls" / (kind if kind == "shift" else f"{kind}-seed{control_seed}")
        result["controls"][kind] = evaluate_poison(ctrl, train_data, test_data, out_dir=ctrl_dir, **kwargs)
        result["control_dirs"][kind] = str(ctrl_dir)
    return result


CERT_RADII_SHOWN = ("0", "0.5", "1", "1.5")


def _pair_key(r: dict) -> tuple:
    return (r["victim_method"], r["arch"], float(r["sigma"]), r["target_class"], r["images"], r["n"])


def format_rows(rows: list[dict]) -> str:
    """Markdown table of evaluation results, clean and poisoned victims side by side.

    Results of :func:`evaluate_poison` are paired by (victim method, arch, sigma, target class,
    images, n): each poisoned result gets one line beside the clean result of the same victim
    settings (one clean victim may face several poisons), and a result without a counterpart shows
    "-" on the missing side. Lines keep the order in which their victim settings first appear.
    """
    groups: dict[tuple, dict] = {}
    for r in rows:
        g = groups.setdefault(_pair_key(r), {"clean": None, "poisoned": []})
        if r["poisoned"]:
            g["poisoned"].append(r)
        elif g["clean"] is None:
            g["clean"] = r
        else:
            raise ValueError(f"two clean results for the same victim settings {_pair_key(r)}")

    def acr(r):
        return "-" if r is None else f"{r['acr']:.4f}"

    def cert(r):
        if r is None:
            return "-"
        ca = r["certified_accuracy"]
        return " / ".join(f"{ca.get(k, float('nan')):.3f}" for k in CERT_RADII_SHOWN)

    def other(r):
        return "-" if r is None else f"{r['clean_accuracy_other_classes']:.4f}"

    head = (
        "| victim | arch | sigma | poison | ACR clean | ACR poisoned | ACR drop "
        "| cert. acc clean r=0 / 0.5 / 1.0 / 1.5 | cert. acc poisoned r=0 / 0.5 / 1.0 / 1.5 "
        "| clean acc other classes: clean / poisoned | images | n |"
    )
    lines = [head, "|" + "---|" * 12]
    for (victim, arch, sigma, _target, images, n), g in groups.items():
        clean = g["clean"]
        for bad in g["poisoned"] or [None]:
            d = acr_drop(clean, bad) if clean is not None and bad is not None else float("nan")
            drop = "-" if d != d else f"{100 * d:.1f}%"  # "-" also when the clean ACR is 0
            poison = "-" if bad is None else str(bad.get("poison_method") or "?")
            lines.append(
                f"| {victim} | {arch} | {sigma:g} | {poison} | {acr(clean)} | {acr(bad)} | {drop} | {cert(clean)} | "
                f"{cert(bad)} | {other(clean)} / {other(bad)} | {images} | {n} |"
            )
    return "\n".join(lines)
