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

import json
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
    from .imagedata import ImageView
    from .validate import InputError, InputTypeError

    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and isinstance(dataset[1], torch.Tensor) and (
            isinstance(dataset[0], (torch.Tensor, ImageView))):
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
    distributed: bool | None = None,
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
        distributed: None (default): split the images over the ranks of the default torch.distributed process group
            when one is initialised (e.g. under torchrun), else run alone; False: run alone; True: the group must be
            there. Rank r certifies ``indices[r::world]`` with the noise of their data-set indices, so every row equals
            a single-process run's; with ``out`` each rank keeps its share in ``OUT.parts/rank{r}-of-{world}.tsv``
            (resumable: relaunch with the same number of processes), and rank 0 then writes ``out``, its summary and
            plot as one process would (the same rows in the same order; only times differ) and removes the parts.
            Every rank returns the whole result. Call it on every rank with the same arguments; the ranks wait for
            the slowest share at the end (within the group's timeout).

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
    from .distributed import world as _world

    rank, world = _world(distributed)
    if world > 1:
        def part(share, part_out, part_settings):
            return certify_dataset(model, dataset, sigma=sigma, n0=n0, n=n, alpha=alpha, out=part_out, indices=share,
                                   seed=seed, batch_size=batch_size, backend=backend, precision=precision,
                                   overwrite=False, settings=part_settings, trace=trace, title=title,
                                   images_per_chunk=images_per_chunk, progress=progress and rank == 0,
                                   distributed=False, **adaptive)

        return _across_ranks(part, rank, world, out=out, indices=indices, settings=settings, expected=expected,
                             overwrite=overwrite, trace=trace, title=title, n0=n0, n=n, plan=plan,
                             model_digest=_model_digest(model))

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
    return _collect(indices, results, expected, summary, plan)


def _collect(indices, results: dict, expected: dict, summary: dict, plan) -> DatasetCertification:
    """The :class:`DatasetCertification` of ``results`` (idx -> (prediction, radius, seconds, samples)) in the order
    of ``indices``; ``summary`` (the log's) or, when empty, the in-memory one."""
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


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _plan_parts(out: Path, world: int, overwrite: bool, settings: dict, indices: list[int]) -> tuple[str, str | None]:
    """Rank 0's decision before a distributed run with ``out``: ("run", None), ("done", None) when ``out`` already
    holds this run finished, or ("error", message)."""
    import shutil

    from .results import ResultsError, read_log, summary_paths

    parts = _parts_dir(out)
    if overwrite:
        for f in (out, *summary_paths(out)):
            if f.exists():
                f.unlink()
        if parts.is_dir():
            shutil.rmtree(parts)
        return "run", None
    if parts.is_dir():  # an interrupted distributed run: its parts resume, ``out`` is written again from them
        mine = {f"rank{r}-of-{world}.tsv" for r in range(world)}
        for f in sorted(parts.glob("*.tsv")):
            if f.name not in mine:
                return "error", (f"{parts} holds {f.name}, a part of a run over another number of processes: relaunch "
                                 "with that many, or start again (overwrite)")
        for r in range(world):
            f = parts / f"rank{r}-of-{world}.tsv"
            if f.exists():
                try:
                    stored, _ = read_log(f)
                except ResultsError as exc:
                    return "error", str(exc)
                want = json.loads(json.dumps({**settings, "rank": r, "world_size": world}))
                if stored["settings"] != want:
                    diff = sorted(k for k in set(want) | set(stored["settings"])
                                  if want.get(k) != stored["settings"].get(k))
                    return "error", f"{f} was made with other settings ({', '.join(diff)} differ); start again (overwrite)"
        return "run", None
    if out.exists():
        try:
            stored, rows = read_log(out)
        except ResultsError as exc:
            return "error", str(exc)
        if stored["settings"] != json.loads(json.dumps(settings)):
            return "error", f"{out} exists from a run with other settings; start again (overwrite) or choose another out"
        if set(rows) != set(indices):
            return "error", (f"{out} holds {len(rows)} of {len(indices)} images of an unfinished single-process run: "
                             "finish it in one process, or start again (overwrite)")
        return "done", None
    return "run", None


def _model_digest(model: torch.nn.Module) -> str:
    """sha256 over a model's parameters and buffers (what the ranks of a distributed run must share)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _across_ranks(part, rank: int, world: int, *, out, indices, settings, expected, overwrite, trace, title, n0, n,
                  plan, model_digest: str) -> DatasetCertification:
    """certify_dataset over the ranks of the default process group (its ``distributed`` argument)."""
    import shutil

    import torch.distributed as dist

    from .distributed import check_same, first_error
    from .results import ResultsError, read_log, run_trace, summary_paths, write_log

    if out is not None:
        summary_paths(Path(out))  # a bad name: refused on every rank alike, before any work
    check_same("certify_dataset's arguments (model, settings, images, output)",
               {"model": model_digest, "settings": settings, "indices": indices, "out": None if out is None else str(out)})
    share = indices[rank::world]

    def run_part(part_out, part_settings):
        error, res = None, None
        try:
            if share:
                res = part(share, part_out, part_settings)
        except Exception as exc:  # every rank learns of it (no rank left waiting for the others)
            error = exc
        failed = first_error(error)
        if failed is not None:
            if error is not None:
                raise error
            raise ResultsError(f"distributed certification failed on {failed}")
        return res

    if out is None:
        res = run_part(None, settings)
        mine = {}
        if res is not None:
            mine = {int(i): (int(p), float(r), float(t), int(k)) for i, p, r, t, k in
                    zip(res.indices, res.prediction, res.radius, res.seconds, res.samples)}
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        results = {i: row for rows in gathered for i, row in rows.items()}
        return _collect(indices, results, expected, {}, plan)

    out = Path(out)
    if rank == 0:
        try:
            plan_parts = _plan_parts(out, world, overwrite, settings, indices)
        except Exception as exc:  # (an unreadable folder, say): every rank gets the error
            plan_parts = ("error", f"{type(exc).__name__}: {exc}")
    decision = [plan_parts if rank == 0 else None]
    dist.broadcast_object_list(decision, src=0)
    what, message = decision[0]
    if what == "error":
        raise ResultsError(message)
    parts = _parts_dir(out)
    if what == "run":
        run_part(parts / f"rank{rank}-of-{world}.tsv", {**settings, "rank": rank, "world_size": world})
    error = None
    if rank == 0 and what == "run":
        try:
            rows: dict[int, tuple] = {}
            for r in range(world):
                if not indices[r::world]:
                    continue
                f = parts / f"rank{r}-of-{world}.tsv"
                _, got = read_log(f)
                if set(got) != set(indices[r::world]):
                    raise ResultsError(f"{f} holds {len(got)} of its {len(indices[r::world])} images")
                rows.update(got)
            write_log(out, settings, rows, indices, trace=run_trace(**(trace or {})),
                      extra={"planned_images": len(indices)}, title=title)
            shutil.rmtree(parts)
        except Exception as exc:  # every rank learns of it
            error = exc
    failed = first_error(error)
    if failed is not None:
        raise ResultsError(f"{out} could not be written from the parts in {parts} ({failed})")
    summary, rows = read_log(out)
    results = {i: (row[2], row[3], row[5], row[6] if len(row) > 6 else n0 + n) for i, row in rows.items()}
    return _collect(indices, results, expected, summary, plan)
