"""Training loop for the certified-robust procedures, with per-epoch checkpoints and exact resume.

Methods (the lower-level problems of PACD; details in docs/ALGORITHMS.md section 2):

- ``"standard"``: cross-entropy on clean inputs.
- ``"gaussian"``: Gaussian data augmentation (Cohen et al. 2019), :func:`engine.losses.gaussian_augmentation`.
- ``"smoothadv"``: SmoothAdv (Salman et al. 2019): per batch, m noise draws, the L2 attack
  :func:`engine.attacks.smoothadv` on the soft smoothed classifier, then cross-entropy on all m
  noisy copies of the attacked inputs with the attack's own noise. Method arguments: ``eps``
  (required, >= 0), ``steps`` (10), ``m`` (1), ``warmup`` (1: epsilon grows linearly over the first
  ``warmup`` epochs, eps * min(1, (epoch + 1) / warmup) in epoch ``epoch`` counted from 0).
- ``"macer"``: MACER (Zhai et al. 2020), :func:`engine.losses.macer`. Method arguments: ``k`` (16),
  ``beta`` (16.0), ``gamma`` (8.0), ``lbd`` (12.0), ``lbd_warmup`` (0: the robustness term's weight is
  lbd * min(1, epoch / lbd_warmup) in epoch ``epoch`` counted from 0, so the first epoch trains the
  classification term alone and lbd is reached after ``lbd_warmup`` epochs; 0 = lbd from the start).

Randomness: the data order of epoch e comes from a CPU generator seeded from (seed, e, 0), all noise
of epoch e (drawn batch after batch, so fresh every batch and epoch) from a generator on the
model's device seeded from (seed, e, 1); the global torch RNG is not used. A checkpoint written
after epoch e (model weights and buffers, optimizer state tensors, scheduler state, history) is
therefore all that is needed to continue: a run resumed from it gives bit-identical weights to an
uninterrupted run on the same device, software and number of CPU threads
(float reductions depend on the thread count).

With ``checkpoint_seconds`` a checkpoint is also written inside long epochs (batches done, running
sums and the state of the epoch's noise generator), and resuming from it is just as exact.
Checkpoints are safetensors files with JSON metadata, written atomically (temporary file, fsync,
rename); no pickle is involved.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import attacks, losses
from . import checkpoint as _checkpoint
from .data import split_validation
from .fileio import ExclusiveLock
from .models import CheckpointError
from .smoothing import model_device, pool_first_view
from .validate import InputError, InputTypeError, check_dataset, check_model_fits, check_progress

__all__ = [
    "train",
    "evaluate",
    "progress_bar",
    "split_validation",
    "epoch_generator",
    "read_checkpoint_meta",
    "METHODS",
    "METHOD_ARGS",
    "CHECKPOINT_FORMAT",
]

METHODS = ("standard", "gaussian", "smoothadv", "macer")
_REQUIRED = object()
# Method arguments and their defaults (``_REQUIRED``: must be given).
METHOD_ARGS = {
    "standard": {},
    "gaussian": {},
    "smoothadv": {"eps": _REQUIRED, "steps": 10, "m": 1, "warmup": 1},
    "macer": {"k": 16, "beta": 16.0, "gamma": 8.0, "lbd": 12.0, "lbd_warmup": 0},
}
CHECKPOINT_FORMAT = "engine.train-checkpoint/1"
_CHECKPOINT = _checkpoint.Layout(
    key="engine",
    error=CheckpointError,
    unreadable="{path}: not a readable safetensors file ({exc})",
    bad_json="{path}: damaged training checkpoint metadata ({exc})",
    not_object="{path}: training checkpoint metadata is a JSON {kind}, not an object",
    no_file="{path}: no such training checkpoint",
)  # (absent metadata reads as {}: the format check below then refuses the file)
RNG_DERIVATION = (
    "torch.Generator.manual_seed((seed * 1000003 + epoch * 7919 + salt) % 2**63); epoch from 0; "
    "salt 0: data order (CPU generator), salt 1: training noise (model device), salt 99 with epoch 0: evaluation noise"
)


def epoch_generator(seed: int, epoch: int, salt: int, device: torch.device) -> torch.Generator:
    """The generator of (seed, epoch, salt) on ``device`` (see ``RNG_DERIVATION``)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % (2**63))
    return g


_epoch_generator = epoch_generator  # former private name


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float32) / 255.0 if images.dtype == torch.uint8 else images.to(torch.float32)


def progress_bar(images: int, desc: str = ""):
    """(progress, close): a :func:`train` ``progress`` callback drawing one tqdm bar per epoch (``images``
    inputs, running loss and accuracy; ``desc`` before "epoch e/E"), and a function closing a bar left open."""
    from tqdm.auto import tqdm

    bar = None

    def progress(p):
        nonlocal bar
        if p["batch"] == 1 or bar is None:  # (a run resumed inside an epoch starts past batch 1)
            bar = tqdm(total=images, desc=f"{desc}epoch {p['epoch']}/{p['epochs']}", unit="img", dynamic_ncols=True)
        bar.update(p["samples"] - bar.n)
        bar.set_postfix(loss=f"{p['loss']:.4f}", acc=f"{p['accuracy']:.4f}", refresh=False)
        if p["batch"] == p["batches"]:
            bar.close()

    def close():
        if bar is not None:
            bar.close()

    return progress, close




@torch.no_grad()
def evaluate(model, data, *, sigma: float, batch_size: int = 1000, seed: int = 0) -> dict:
    """Clean accuracy and accuracy under one Gaussian draw per image (fixed ``seed``), in eval mode.

    data: (images (N, C, H, W) uint8 or float in [0, 1], labels (N,)). Returns
    ``{"eval_accuracy": float, "eval_noisy_accuracy": float}``; the model's mode is restored.
    """
    images, labels = check_dataset(data, "eval_data")
    device = model_device(model, torch.device("cpu"))
    was_training = model.training
    model.eval()
    g = epoch_generator(seed, 0, 99, device)
    clean = noisy = 0
    try:
        for i in range(0, images.shape[0], batch_size):
            x = _as_float(images[i : i + batch_size]).to(device)
            y = labels[i : i + batch_size].to(device)
            clean += int((model(x).argmax(1) == y).sum())
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=g, device=device)
            noisy += int((model(x).argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return {"eval_accuracy": clean / images.shape[0], "eval_noisy_accuracy": noisy / images.shape[0]}


def _method_args(method: str, given: dict) -> dict:
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    spec = METHOD_ARGS[method]
    unknown = sorted(set(given) - set(spec))
    if unknown:
        takes = ", ".join(f"{m}: {', '.join(a) or '-'}" for m, a in METHOD_ARGS.items())
        raise InputError(f"method {method!r} takes no argument(s) {', '.join(unknown)} (method arguments: {takes})")
    args = {}
    for name, default in spec.items():
        value = given.get(name, default)
        if value is _REQUIRED:
            raise InputError(f"method {method!r} needs the argument {name}")
        args[name] = value
    if method == "smoothadv":
        args["eps"] = losses._check_float("eps", args["eps"], nonnegative=True)
        for name in ("steps", "m", "warmup"):
            losses._check_int(name, args[name], 1)
    elif method == "macer":
        _, args["k"], args["beta"], args["gamma"], args["lbd"] = losses._check_macer(
            1.0, args["k"], args["beta"], args["gamma"], args["lbd"]
        )
        args["lbd_warmup"] = losses._check_int("lbd_warmup", args["lbd_warmup"], 0)
    return args


def _smoothadv_eps(args: dict, epoch: int) -> float:
    """SmoothAdv's attack radius in epoch ``epoch`` (from 0): eps * min(1, (epoch + 1) / warmup)."""
    return args["eps"] * min(1.0, (epoch + 1) / args["warmup"])


def _macer_lbd(args: dict, epoch: int) -> float:
    """MACER's robustness weight in epoch ``epoch`` (from 0): lbd * min(1, epoch / lbd_warmup)."""
    return args["lbd"] * min(1.0, epoch / args["lbd_warmup"]) if args["lbd_warmup"] else args["lbd"]


def _lr_lambda(schedule: str, total_steps: int):
    if schedule == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total_steps))
    if schedule == "step":  # lr / 10 at 50% and lr / 100 at 75% of the steps
        milestones = (int(0.5 * total_steps), int(0.75 * total_steps))
        return lambda s: 0.1 ** sum(s >= m for m in milestones)
    return lambda s: 1.0


def _batch_loss(method, model, x, y, sigma, args, epoch, g) -> tuple[torch.Tensor, int, int]:
    """Mean loss of one batch, correct predictions and number of predictions (inputs or noisy copies)."""
    if method == "standard":
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        target = y
    elif method == "gaussian":
        per, logits = losses._gaussian_augmentation(model, x, y, sigma, g)
        loss, target = per.mean(), y
    elif method == "smoothadv":
        eps = _smoothadv_eps(args, epoch)
        noise = torch.randn((x.shape[0], args["m"]) + tuple(x.shape[1:]), generator=g, device=x.device, dtype=x.dtype)
        x_adv = attacks.smoothadv(model, x, y, sigma=sigma, eps=eps, steps=args["steps"], m=args["m"], generator=g, noise=noise)
        per, logits = losses._noisy_cross_entropy(model, x_adv, y, sigma, noise)
        loss, target = per.mean(), y.repeat_interleave(args["m"])
    else:  # macer
        lbd = _macer_lbd(args, epoch)
        loss, _, _, logits = losses._macer(model, x, y, sigma, args["k"], args["beta"], args["gamma"], lbd, g)
        logits = logits.reshape(-1, logits.shape[-1])
        target = y.repeat_interleave(args["k"])
    return loss, int((logits.detach().argmax(1) == target).sum()), int(target.shape[0])


# -- checkpoints ----------------------------------------------------------------------------------
def _data_sha256(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (images, labels):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save_checkpoint(
    path: Path, model, opt, sched, epoch: int, history: list, settings: dict, partial: dict | None = None, rng_state=None
) -> None:
    """Write a checkpoint after ``epoch`` finished epochs, or inside epoch ``epoch`` (0-based) when
    ``partial`` (batches done, running sums) and ``rng_state`` (the epoch's noise generator) are given."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if partial is not None:
        tensors["rng.noise_state"] = rng_state
    opt_tensors, opt_state_json, groups = _checkpoint.optimizer_to_tensors(
        opt.state_dict(), "optimizer.state.", ".", scalars_as_tensors=False
    )
    tensors.update(opt_tensors)
    sched_sd = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    meta = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "settings": settings,
        "history": history,
        "optimizer": {"param_groups": groups, "state": opt_state_json},
        "scheduler": sched_sd,
        "rng": {"derivation": RNG_DERIVATION, "seed": settings["seed"], "next_epoch": epoch},
    }
    if partial is not None:
        meta["partial_epoch"] = partial
    _checkpoint.save(path, tensors, meta, _CHECKPOINT.key)


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata of a training checkpoint (format, epoch, settings, history, optimizer, scheduler, rng)."""
    path = Path(path)
    meta, _ = _checkpoint.read(path, _CHECKPOINT)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a training checkpoint (format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    opt = meta.get("optimizer")
    problems = [what for what, ok in (
        ("settings (an object)", isinstance(meta.get("settings"), dict)),
        ("epoch (an integer >= 0)", isinstance(meta.get("epoch"), int) and meta["epoch"] >= 0),
        ("history (a list)", isinstance(meta.get("history"), list)),
        ("optimizer (state and param_groups)", isinstance(opt, dict) and isinstance(opt.get("state"), dict)
         and isinstance(opt.get("param_groups"), list) and all(isinstance(g, dict) for g in opt["param_groups"])),
        ("scheduler (an object)", isinstance(meta.get("scheduler"), dict)),
        ("partial_epoch (an object or null)", isinstance(meta.get("partial_epoch"), (dict, type(None)))),
    ) if not ok]
    if problems:
        raise CheckpointError(f"{path}: damaged training checkpoint: missing or malformed {', '.join(problems)}")
    return meta


def _load_checkpoint(path: Path, model, opt, sched, settings: dict) -> tuple[int, list]:
    meta = read_checkpoint_meta(path)
    stored = meta["settings"]
    if stored != settings:
        diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        detail = "; ".join(f"{k}: checkpoint {stored.get(k)!r}, now {settings.get(k)!r}" for k in diff if k != "params")
        raise CheckpointError(
            f"{path} was written by a run with other settings ({', '.join(diff)} differ{': ' + detail if detail else ''}); "
            "resume with the same settings, or start again without resume"
        )
    tensors = _checkpoint.read_tensors(path, CheckpointError)
    model_sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the model: {exc}") from exc
    try:
        groups = _checkpoint.restore_tuples(meta["optimizer"]["param_groups"], opt.param_groups)  # (Adam's betas)
        opt.load_state_dict(_checkpoint.optimizer_from_tensors(
            tensors, groups, "optimizer.state.", ".", scalars=meta["optimizer"]["state"]
        ))
        sched.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(opt.param_groups)})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # (a file that passed the checks above)
        raise CheckpointError(f"{path}: damaged optimizer or scheduler state ({type(exc).__name__}: {exc})") from None
    partial = meta.get("partial_epoch")
    if partial is not None:
        if "rng.noise_state" not in tensors:
            raise CheckpointError(f"{path}: a mid-epoch checkpoint without its noise generator state")
        partial = {**partial, "rng_state": tensors["rng.noise_state"]}
    return int(meta["epoch"]), list(meta["history"]), partial


def train(
    model: torch.nn.Module,
    train_data,
    *,
    method: str = "gaussian",
    sigma: float = 0.25,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.01,
    optimizer: str = "sgd",
    schedule: str = "cosine",
    seed: int = 0,
    eval_data=None,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    log=None,
    progress=None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    checkpoint_seconds: float | None = None,
    channels_last: bool | None = None,
    init_weights: str | None = None,
    **method_args,
):
    """Train ``model`` in place with a certified-robust procedure (see the module docstring).

    Args:
        model: classifier, (N, C, H, W) pixels in [0, 1] -> (N, classes) logits; trained on its device.
        train_data: (images (N, C, H, W) uint8 or float in [0, 1], labels (N,) int64).
        method: "standard", "gaussian", "smoothadv" or "macer".
        sigma: noise level, > 0 for the noisy methods, >= 0 for "standard" (where it only sets the
            noise of the evaluation accuracy).
        epochs, batch_size, lr: as usual; ``batch_size`` counts inputs (SmoothAdv and MACER run
            m or k noisy copies of each).
        optimizer: "sgd" (``momentum``, ``weight_decay``) or "adam" (``weight_decay``).
        schedule: per-step "cosine", "step" (lr / 10 at 50% and 75% of the steps) or "constant".
        seed: data order and noise are reproducible from it (per-epoch generators, module docstring).
        eval_data: optional (images, labels) evaluated after every epoch (:func:`evaluate`).
        log: optional callable receiving each epoch's history entry (after its checkpoint is written).
        progress: a tqdm bar per epoch (:func:`progress_bar`): None (default) draws it only when stderr
            is a terminal (never under pytest or in a log file), True always, False never; or a callable
            receiving, after every batch, a dict with epoch, epochs, batch, batches, samples (inputs seen
            this epoch), loss and accuracy (running epoch means).
        checkpoint: optional path of a training checkpoint written (atomically) after every epoch; an
            existing file there is replaced unless ``resume``.
        resume: continue from ``checkpoint`` when it exists (settings, data and model must match,
            else :class:`engine.models.CheckpointError`); a finished run is returned as it is.
        stop_after_epoch: return once this epoch (1-based) is done and checkpointed, even if
            ``epochs`` is larger; continue later with ``resume=True``.
        checkpoint_seconds: also write a mid-epoch checkpoint (batches done, running sums, the state
            of the epoch's noise generator) once this many seconds have passed since the last one, so
            an interrupted long epoch loses at most that much work; resuming from it is as exact as
            from an epoch checkpoint. None: epoch checkpoints only.
        channels_last: train with channels-last convolution weights and activations (None: on the
            CPU for models with a Conv2d, about 1.4-1.6x faster for LeNet there); the model is
            handed back in the standard layout. Values change only by float rounding.
        init_weights: optional identifier (e.g. the sha256 of the file) of the weights ``model`` starts from
            instead of a random initialisation; recorded in the checkpoint's settings, so that a resume of
            a run started from other weights is refused.
        **method_args: the method's arguments (``METHOD_ARGS``); any other name raises ValueError.

    Raises:
        :class:`engine.validate.InputError` (a ValueError) for bad arguments or data: images not
        (N, C, H, W) uint8 or floats in [0, 1] (NaN, or floats in [0, 255], are refused), labels not
        integers, not one per image, negative or beyond the model's outputs, and a model that fails on
        one training image (e.g. a 3-channel network given 1-channel images); all before the first step.

    Returns:
        (model, history): the model (eval mode) and a list with one dict per finished epoch:
        epoch, loss, accuracy (of the predictions trained on: clean inputs for "standard", noisy
        copies otherwise, attacked ones for "smoothadv"), seconds (training time of the epoch),
        lr, and with ``eval_data`` eval_accuracy and eval_noisy_accuracy (one noise draw).
    """
    args = _method_args(method, method_args)
    if checkpoint is not None and Path(checkpoint).is_dir():
        raise InputError(f"checkpoint {checkpoint} is a directory: give the checkpoint file's path")
    sigma = losses._check_sigma(sigma, allow_zero=method == "standard")
    if optimizer not in ("sgd", "adam"):
        raise InputError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if schedule not in ("cosine", "step", "constant"):
        raise InputError(f"schedule must be 'cosine', 'step' or 'constant', got {schedule!r}")
    losses._check_int("epochs", epochs, 1)
    losses._check_int("batch_size", batch_size, 1)
    losses._check_int("seed", seed, 0)
    lr = losses._check_float("lr", lr, positive=True)
    momentum = losses._check_float("momentum", momentum, nonnegative=True)
    weight_decay = losses._check_float("weight_decay", weight_decay, nonnegative=True)
    if stop_after_epoch is not None:
        losses._check_int("stop_after_epoch", stop_after_epoch, 1)
    if resume and checkpoint is None:
        raise InputError("resume=True needs a checkpoint path")
    if checkpoint_seconds is not None:
        checkpoint_seconds = losses._check_float("checkpoint_seconds", checkpoint_seconds, nonnegative=True)
        if checkpoint is None:
            raise InputError("checkpoint_seconds needs a checkpoint path")
    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")
    images, labels = check_dataset(train_data, "train_data")
    if eval_data is not None:
        eval_images, eval_labels = check_dataset(eval_data, "eval_data")
    # one forward of one image, before anything is built or written: a model that does not take these images,
    # or fewer outputs than the labels need, is refused in one line instead of failing inside the first step
    classes = check_model_fits(model, images, labels=labels, labels_name="train_data labels")
    if eval_data is not None:
        if tuple(eval_images.shape[1:]) != tuple(images.shape[1:]):
            check_model_fits(model, eval_images, num_classes=classes)
        if int(eval_labels.max()) >= classes:
            raise InputError(f"eval_data labels go up to {int(eval_labels.max())} but the model has {classes} outputs "
                             f"(classes 0..{classes - 1})")
    progress = check_progress(progress)
    close_bar = None
    if progress is True:
        progress, close_bar = progress_bar(images.shape[0])
    elif progress is False:
        progress = None
    device = model_device(model, torch.device("cpu"))
    if channels_last is None:  # auto: conv nets on the CPU (oneDNN's NHWC kernels are much faster there)
        channels_last = device.type == "cpu" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if channels_last:  # before the optimizer is built: parameters keep their identity, only their strides change
        model.to(memory_format=torch.channels_last)
    forward = pool_first_view(model)  # same layers and parameters, ReLU after each max-pool (same gradients)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    n = images.shape[0]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(schedule, epochs * steps_per_epoch))

    lock = None
    try:
        if checkpoint is not None:  # one writer per checkpoint: a second run of the same job is refused
            lock = ExclusiveLock(checkpoint).acquire()
        start_epoch, history, partial = 0, [], None
        ckpt_path = None if checkpoint is None else Path(checkpoint)
        settings = None
        if ckpt_path is not None:
            settings = {
                "method": method,
                "method_args": args,
                "sigma": sigma,
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "optimizer": optimizer,
                "schedule": schedule,
                "seed": seed,
                "momentum": momentum,
                "weight_decay": weight_decay,
                "train_size": n,
                "train_sha256": _data_sha256(images, labels),
                "params": [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()],
            }
            if init_weights is not None:  # only then: checkpoints of runs from a random start stay resumable
                settings["init_weights"] = str(init_weights)
            settings = json.loads(json.dumps(settings))
            if resume and ckpt_path.exists():
                start_epoch, history, partial = _load_checkpoint(ckpt_path, model, opt, sched, settings)

        # an epoch interrupted inside is always finished first: the model in hand is part-way through it
        done = start_epoch + (1 if partial is not None else 0)
        last_epoch = epochs if stop_after_epoch is None else min(epochs, max(stop_after_epoch, done))
        for epoch in range(start_epoch, last_epoch):
            model.train()
            g_cpu = epoch_generator(seed, epoch, 0, torch.device("cpu"))
            g_dev = epoch_generator(seed, epoch, 1, device)
            order = torch.randperm(n, generator=g_cpu)
            t0 = time.perf_counter()
            loss_sum, correct, counted, seen, skip = 0.0, 0, 0, 0, 0
            if partial is not None and epoch == start_epoch:  # resume inside this epoch
                skip = int(partial["batches_done"])
                loss_sum, correct, counted, seen = (
                    float(partial["loss_sum"]), int(partial["correct"]), int(partial["counted"]), int(partial["seen"])
                )  # fmt: skip
                t0 -= float(partial["seconds"])
                g_dev.set_state(partial["rng_state"].to(g_dev.get_state().device))
            last_save = time.perf_counter()
            for b, i in enumerate(range(0, n, batch_size)):
                if b < skip:
                    continue
                idx = order[i : i + batch_size]
                x = _as_float(images[idx]).to(device)
                y = labels[idx].to(device)
                loss, c, k = _batch_loss(method, forward, x, y, sigma, args, epoch, g_dev)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * y.shape[0]
                correct += c
                counted += k
                seen += y.shape[0]
                now = time.perf_counter()
                if checkpoint_seconds is not None and b + 1 < steps_per_epoch and now - last_save >= checkpoint_seconds:
                    part = {"batches_done": b + 1, "loss_sum": loss_sum, "correct": correct, "counted": counted, "seen": seen,
                            "seconds": now - t0}  # fmt: skip
                    _save_checkpoint(ckpt_path, model, opt, sched, epoch, history, settings, part, g_dev.get_state())
                    last_save = time.perf_counter()
                if progress is not None:
                    progress(
                        {
                            "epoch": epoch + 1,
                            "epochs": epochs,
                            "batch": b + 1,
                            "batches": steps_per_epoch,
                            "samples": seen,
                            "loss": loss_sum / seen,
                            "accuracy": correct / counted,
                        }
                    )
            entry = {
                "epoch": epoch + 1,
                "loss": loss_sum / seen,
                "accuracy": correct / counted,
                "seconds": time.perf_counter() - t0,
                "lr": opt.param_groups[0]["lr"],
            }
            if method == "smoothadv":
                entry["eps"] = _smoothadv_eps(args, epoch)
            if method == "macer":
                entry["lbd"] = _macer_lbd(args, epoch)
            if eval_data is not None:
                entry.update(evaluate(model, eval_data, sigma=sigma, seed=seed))
            history.append(entry)
            if ckpt_path is not None:
                _save_checkpoint(ckpt_path, model, opt, sched, epoch + 1, history, settings)
            if log is not None:
                log(entry)
        model.eval()
        return model, history
    finally:
        if close_bar is not None:
            close_bar()
        if channels_last:  # hand the model back in the standard layout (same values)
            model.to(memory_format=torch.contiguous_format)
        if lock is not None:
            lock.release()
