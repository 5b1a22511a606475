"""Training loop for the certified-robust procedures."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import losses
from .smoothing import model_device

__all__ = ["train", "METHODS"]

METHODS = ("standard", "gaussian")


def _epoch_generator(seed: int, epoch: int, salt: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % (2**63))
    return g


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float32) / 255.0 if images.dtype == torch.uint8 else images.to(torch.float32)


def _check_data(name: str, data) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError(f"{name} must be a pair (images (N, C, H, W), labels (N,))")
    images, labels = data
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"{name} images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{name} labels must be a ({images.shape[0]},) tensor, got {getattr(labels, 'shape', type(labels))}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return images, labels.to(torch.int64)


@torch.no_grad()
def evaluate(model, data, *, sigma: float, batch_size: int = 1000, seed: int = 0) -> dict:
    """Clean accuracy and accuracy under one Gaussian draw per image (fixed ``seed``), in eval mode."""
    images, labels = _check_data("eval_data", data)
    device = model_device(model, torch.device("cpu"))
    was_training = model.training
    model.eval()
    g = _epoch_generator(seed, 0, 99, device)
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
):
    """Train ``model`` in place with a certified-robust procedure.

    Args:
        train_data: (images (N, C, H, W) uint8 or float in [0, 1], labels (N,) int64).
        method: "standard" (clean cross-entropy) or "gaussian" (Gaussian augmentation, fresh noise
            every batch and epoch).
        sigma: noise level for "gaussian" (> 0) and for the noisy evaluation accuracy.
        schedule: "cosine", "step" (lr / 10 at 50% and 75% of the epochs) or "constant".
        optimizer: "sgd" (momentum, weight decay) or "adam".
        seed: data order and noise are reproducible from it (per-epoch generators).
        eval_data: optional (images, labels) evaluated after every epoch.
        log: optional callable receiving each epoch's history entry.

    Returns:
        (model, history): history is a list of per-epoch dicts with loss, accuracy (on the inputs
        trained on), and eval accuracies when ``eval_data`` is given.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    sigma = losses._check_sigma(sigma, allow_zero=method == "standard")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if schedule not in ("cosine", "step", "constant"):
        raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {schedule!r}")
    if int(epochs) < 1 or int(batch_size) < 1 or not lr > 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    images, labels = _check_data("train_data", train_data)
    device = model_device(model, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (images.shape[0] + batch_size - 1) // batch_size
    total_steps = epochs * steps_per_epoch
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / total_steps)).item())
        )
    elif schedule == "step":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.5 * total_steps), int(0.75 * total_steps)], 0.1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    history = []
    for epoch in range(epochs):
        model.train()
        g_cpu = _epoch_generator(seed, epoch, 0, torch.device("cpu"))
        g_dev = _epoch_generator(seed, epoch, 1, device)
        order = torch.randperm(images.shape[0], generator=g_cpu)
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(0, images.shape[0], batch_size):
            idx = order[i : i + batch_size]
            x = _as_float(images[idx]).to(device)
            y = labels[idx].to(device)
            if method == "gaussian":
                x = x + sigma * torch.randn(x.shape, generator=g_dev, device=device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * y.shape[0]
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
        entry = {
            "epoch": epoch + 1,
            "loss": loss_sum / seen,
            "accuracy": correct / seen,
            "seconds": time.perf_counter() - t0,
            "lr": opt.param_groups[0]["lr"],
        }
        if eval_data is not None:
            entry.update(evaluate(model, eval_data, sigma=sigma, seed=seed))
        history.append(entry)
        if log is not None:
            log(entry)
    model.eval()
    return model, history
