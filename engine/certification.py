"""Data-set certification in the library: :func:`certify_dataset`.

Cohen et al.'s CERTIFY (:func:`engine.certify`) over the images of a data set, several images to each
forward batch (the samples of a chunk of images are laid out image-major and cut into batches, so a
batch holds samples of several images when n0 + n is small against the batch), with the noise keyed
by (seed, data-set index, sample): results do not depend on the batch size or on which images share a
chunk (on the CPU, up to float near-ties, see docs/reproducibility.md). Given ``out``, the per-image
rows go to a resumable log (:class:`engine.results.ResultsLog`: rows flushed and fsync'ed as each
chunk finishes, a truncated last line repaired, other settings or a missing summary refused, one
writer per file) with its JSON summary and PNG plot.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["certify_dataset", "DatasetCertification", "select_indices"]


def select_indices(count: int, skip: int, max_index: int, shard: int = 0, num_shards: int = 1) -> list[int]:
    """Cohen et al.'s selection: every ``skip``-th index below ``max_index`` (-1: all), then this shard's share."""
    stop = count if max_index < 0 else min(count, max_index)
    chosen = list(range(0, stop, skip))
    return chosen[shard::num_shards]


@dataclass
class DatasetCertification:
    """Per-image results of :func:`certify_dataset`, in the order of ``indices`` (resumed rows included)."""

    indices: torch.Tensor  # (B,) int64 data-set indices
    labels: torch.Tensor  # (B,) int64
    prediction: torch.Tensor  # (B,) int64, -1 = abstain
    radius: torch.Tensor  # (B,) float64
    seconds: torch.Tensor  # (B,) float64 per image
    samples: torch.Tensor  # (B,) int64 samples drawn per image (selection + estimation)
    summary: dict = field(default_factory=dict)  # metrics (and, with ``out``, the log's JSON summary)

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def _as_tensors(dataset):
    """(images, labels) of a (images, labels) pair of tensors, or, for an indexable data set of (image, label), lazy
    views that read an item only when asked for it (nothing is decoded before the work starts)."""
    from .validate import InputError, InputTypeError

    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(isinstance(t, torch.Tensor) for t in dataset):
        return dataset[0], dataset[1]
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise InputTypeError(f"dataset must be (images, labels) tensors or an indexable data set of (image, label), got "
                             f"{type(dataset).__name__}")
    if len(dataset) == 0:
        raise InputError("dataset is empty")
    first = dataset[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2 and isinstance(first[0], torch.Tensor)):
        raise InputTypeError(f"dataset items must be (image tensor, label) pairs, got {type(first).__name__}")
    return _LazyImages(dataset, first), _LazyLabels(dataset)


class _LazyImages:
    """images[ids] of an indexable data set, read on demand (one chunk at a time)."""

    def __init__(self, dataset, first):
        self.dataset = dataset
        self.shape = (len(dataset), *tuple(first[0].shape))
        self.dtype = first[0].dtype

    def __getitem__(self, ids):
        return torch.stack([self.dataset[int(i)][0] for i in ids])


class _LazyLabels:
    """labels[i] of an indexable data set (its ``targets`` when it has them, else the items' second element)."""

    def __init__(self, dataset):
        self.dataset = dataset
        targets = getattr(dataset, "targets", None)
        self.targets = None if targets is None or len(targets) != len(dataset) else targets
        self.shape = (len(dataset),)

    def dim(self) -> int:
        return 1

    def __getitem__(self, i):
        if isinstance(i, torch.Tensor):
            return torch.tensor([self[int(k)] for k in i.tolist()], dtype=torch.int64)
        return int(self.targets[i]) if self.targets is not None else int(self.dataset[int(i)][1])


def certify_dataset(
    model: torch.nn.Module,
    dataset,
    *,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    out: str | os.PathLike | None = None,
    indices=None,
    seed: int = 0,
    batch_size: int | None = None,
    backend: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
    settings: dict | None = None,
    trace: dict | None = None,
    title: str | None = None,
    images_per_chunk: int | None = None,
    progress: bool | None = None,
    sampling: str = "fixed",
    radii=None,
    radius_tol: float | None = None,
    noise: str = "gaussian",
) -> DatasetCertification:
    """Certify ``model``'s smoothed classifier at the images of ``dataset`` (Cohen et al., CERTIFY).

    Args:
        model: as for :func:`engine.certify` (pixels in [0, 1] in, logits out, normalisation inside).
        dataset: (images (N, C, H, W) uint8 or float in [0, 1], labels (N,)) tensors, or an indexable data set of
            (image (C, H, W), label) pairs (e.g. a torchvision data set whose transform gives [0, 1] tensors).
        sigma, n0, n, alpha, seed, batch_size, backend, precision: as for :func:`engine.certify`.
        out: the per-image log (.tsv; its .json summary and .png plot beside it) written and resumed as
            described in the module docstring; None: results in memory only.
        indices: the data-set indices to certify (default: all), each once; they key the noise.
        overwrite: start ``out`` again instead of resuming it.
        settings: what identifies the run in the log (compared on resume; default: sigma, n0, n, alpha, seed,
            the number of images and the precision). The command line records the model's sha256, the data
            set and the selection.
        trace: recorded in the summary, not compared (see :func:`engine.results.run_trace`).
        title: of the plot (default from the settings).
        images_per_chunk: images certified together (default: enough to fill a forward batch with their
            n0 + n samples, at least 1). Rows are logged as each chunk finishes.
        progress: a tqdm bar over images: None (default) on a terminal only, True, False.
        sampling, radii, radius_tol: as for :func:`engine.certify`: "adaptive" draws the estimation samples in
            looks and stops each image once settled (:mod:`engine.adaptive`), decision mode with ``radii``,
            radius mode with ``radius_tol``. The plan is part of the log's settings; its rows get a
            ``samples`` column and the summary the mean samples per image.
        noise: "gaussian" or "discrete" (sound noise on the 8-bit grid, :func:`engine.certify`); recorded in the
            settings when not "gaussian".

    Returns:
        :class:`DatasetCertification`. The guarantee is :func:`engine.certify`'s, per image.
    """
    from tqdm.auto import tqdm

    from . import data as _data
    from .fileio import ExclusiveLock
    from .noise import _check_noise as _noise_kind
    from .results import ResultsLog, run_trace, summary_paths
    from .smoothing import _check_alpha, _check_int, _check_sigma, certify, default_batch_size, model_device, sampling_plan
    from .validate import InputError, check_progress

    sigma, alpha = _check_sigma(sigma), _check_alpha(alpha)
    n0, n = _check_int("n0", n0, 1), _check_int("n", n, 1)
    progress = check_progress(progress, allow_callable=False)
    plan = sampling_plan(sampling, n, alpha, radii, radius_tol)
    noise = _noise_kind(noise)
    images, labels = _as_tensors(dataset)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise InputError(f"dataset labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
    count = images.shape[0]
    indices = list(range(count)) if indices is None else [int(i) for i in indices]
    if not indices:
        raise InputError("nothing to certify: the selection of images is empty")
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise InputError(f"indices {bad[:5]} lie outside the data set of {count} images")
    if len(set(indices)) != len(indices):
        raise InputError("indices must not repeat an image")
    if images_per_chunk is None:
        pixels = math.prod(images.shape[1:])
        per_batch = batch_size or default_batch_size(pixels, model_device(model, torch.device("cpu")))
        # fixed: the images whose samples fill a forward batch; adaptive: enough that the first look fills a few
        images_per_chunk = max(1, per_batch // (n0 + n) if plan is None else 4 * per_batch // (n0 + plan.looks[0]))
    images_per_chunk = _check_int("images_per_chunk", images_per_chunk, 1)
    if settings is None:
        settings = {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "seed": seed, "images": len(indices)}
        if precision not in ("auto", "fp32"):
            settings["precision"] = precision
    if plan is not None:
        settings = {**settings, **plan.describe()}
    if noise != "gaussian":
        settings = {**settings, "noise": noise}
    expected = {i: int(labels[i]) for i in indices}
    results: dict[int, tuple[int, float, float, int]] = {}
    adaptive = dict(sampling=sampling, radii=radii, radius_tol=radius_tol, noise=noise)

    def run(log) -> None:
        todo = [i for i in indices if log is None or i not in log.done]
        bar = tqdm(total=len(indices), initial=len(indices) - len(todo), unit="img", desc="certify",
                   disable=not progress, dynamic_ncols=True)
        try:
            for start in range(0, len(todo), images_per_chunk):
                ids = torch.tensor(todo[start : start + images_per_chunk], dtype=torch.int64)
                t0 = time.perf_counter()
                x = images[ids]
                x = _data.to_float(x) if x.dtype == torch.uint8 else x.to(torch.float32)
                res = certify(model, x, sigma=sigma, n0=n0, n=n, alpha=alpha,
                              batch_size=batch_size, seed=seed, image_ids=ids, backend=backend, precision=precision,
                              progress=False, **adaptive)
                elapsed = time.perf_counter() - t0
                share = res.samples.double() / res.samples.sum().double()  # the chunk's time, by samples drawn
                for k, i in enumerate(ids.tolist()):
                    row = (int(res.prediction[k]), float(res.radius[k]), elapsed * float(share[k]), int(res.samples[k]))
                    if log is not None:  # the values the log holds (rounded), as a resume reads them
                        log.append(i, expected[i], *row[:3], *([row[3]] if plan is not None else []))
                        row = (row[0], log.rows[i][3], log.rows[i][5], row[3])
                    results[i] = row
                bar.set_postfix(samples_per_s=f"{int(res.samples.sum()) / max(elapsed, 1e-9):,.0f}")
                bar.update(len(ids))
        finally:
            bar.close()

    summary: dict = {}
    if out is None:
        run(None)
    else:
        out = Path(out)
        summary_paths(out)  # a log named like its summary or plot: refused before anything is written
        with ExclusiveLock(out) as lock:
            log = ResultsLog(out, settings, overwrite=overwrite, expected=expected, trace=run_trace(**(trace or {})))
            lock.bind()  # the log exists now: its other names (hard links) are locked too
            planned = {"planned_images": len(indices)}
            log.write_summary(extra=planned)
            if log.repaired_bytes:
                print(f"repaired {out}: dropped a truncated last line ({log.repaired_bytes} bytes)", file=sys.stderr)
            for i, row in log.rows.items():
                results[i] = (row[2], row[3], row[5], row[6] if len(row) > 6 else n0 + n)
            finished = False
            try:
                run(log)
                finished = True
            finally:
                if finished or not log.discard():  # failed before its first image: no empty outputs
                    summary = log.write_summary(extra=planned)
                    log.plot(title=title)
    order = [i for i in indices if i in results]
    pred = torch.tensor([results[i][0] for i in order], dtype=torch.int64)
    radius = torch.tensor([results[i][1] for i in order], dtype=torch.float64)
    seconds = torch.tensor([results[i][2] for i in order], dtype=torch.float64)
    samples = torch.tensor([results[i][3] for i in order], dtype=torch.int64)
    lab = torch.tensor([expected[i] for i in order], dtype=torch.int64)
    if not summary:
        from . import metrics

        grid = list(plan.radii) if plan is not None and plan.radii is not None else metrics.DEFAULT_RADII
        summary = {"images": len(order), **metrics.summary(pred.numpy(), radius.numpy(), lab.numpy(), grid)}
        summary.update(samples_total=int(samples.sum()), samples_per_image=float(samples.double().mean()))
    return DatasetCertification(torch.tensor(order, dtype=torch.int64), lab, pred, radius, seconds, samples, summary)
