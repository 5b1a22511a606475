"""Command line: ``python -m engine <command>``.

Commands: ``certify`` (Cohen et al.'s certify over a data set, resumable), ``demo`` (the embedded
default: train LeNet with Gaussian augmentation on the shipped MNIST subset and certify 100 test
images), ``make-subset`` (cut a small MNIST subset), ``train`` (certified-robust training with a
checkpoint every epoch and ``--resume``), ``poison`` (craft a PACD poison, resumable),
``poison-snapshot`` (the poison of a running or stopped poisoning run, from its checkpoint),
``poison-combine`` (one poison from several of the same data and settings; of several
procedures with ``--mixed-methods``), ``poison-encode`` (store a poison file as float32, int8 or
sign), ``evaluate``
(train a victim on clean or poisoned data and certify the target class, resumable).

Models: ``certify`` takes ``--checkpoint FILE`` (the engine's own checkpoint) or ``--weights FILE
--arch NAME`` (a safetensors file or a PyTorch state_dict, read with ``weights_only=True`` and never
unpickled; an engine checkpoint needs no ``--arch``); ``train`` and ``evaluate`` take ``--weights FILE``
to start from given weights. ``--arch``: lenet, mlp, resnet20, resnet110, ``torchvision.<model>``
(optional torchvision) or a name given to ``engine.models.register`` (see :mod:`engine.models`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .fileio import sha256_file
from .pacd import COMBINE, CONTROLS
from .presets import PRESETS, preset
from .results import ResultsError

__all__ = ["main", "run_certify", "train_checkpoint_path"]


class UsageError(Exception):
    """A bad command-line input found after parsing: printed as one ``error:`` line, exit status 2."""


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links and other spellings included); false if either does not exist and
    their resolved paths differ."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False



def _claim_outputs(outputs, inputs=(), *, overwrite: bool = False, flag: str = "--out") -> None:
    """Refuse, before any work, an output that is one of the inputs (always) or that exists (unless ``overwrite``):
    no output of a command replaces another file by surprise."""
    outputs = [Path(o) for o in outputs]
    for o in outputs:
        for i in (Path(x) for x in inputs if x is not None):
            if _same_file(o, i) or Path(os.path.abspath(o)).resolve() == Path(os.path.abspath(i)).resolve():
                what = flag if o == outputs[0] else f"{flag} {outputs[0]}'s companion"
                raise UsageError(f"{what} {o} would overwrite {i}, an input of this command")
        if o.is_dir():
            raise UsageError(f"{o} is a directory: {flag} names a file")
        if o.exists() and not overwrite:
            raise UsageError(f"{o} exists; pass --overwrite to replace it (or give another {flag})")


def _device(name: str) -> torch.device:
    """The device of ``--device NAME``; CUDA where this machine has none is an InputError naming ``--device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from .validate import check_device

    return check_device(name, "--device")


from .certification import select_indices  # noqa: E402  (Cohen et al.'s selection; the command line's --skip/--max)


def run_certify(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices,
    out: Path,
    settings: dict,
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int | None,
    seed: int,
    overwrite: bool = False,
    show_progress: bool = True,
    backend: str = "auto",
    precision: str = "auto",
    trace: dict | None = None,
    title: str | None = None,
    sampling: str = "fixed",
    radii=None,
    radius_tol: float | None = None,
    noise: str = "gaussian",
) -> dict:
    """Certify ``images[indices]`` into a resumable log and return its summary: :func:`engine.certify_dataset`
    with the command line's settings (kept for scripts that call it)."""
    from .certification import certify_dataset

    return certify_dataset(model, (images, labels), sigma=sigma, n0=n0, n=n, alpha=alpha, out=out, indices=indices,
                           seed=seed, batch_size=batch_size, backend=backend, precision=precision, overwrite=overwrite,
                           settings=settings, trace=trace, title=title, progress=show_progress, sampling=sampling,
                           radii=radii, radius_tol=radius_tol, noise=noise).summary


def format_table(summary: dict) -> str:
    lines = [
        f"images            {summary.get('images', 0)}",
        f"ACR               {summary.get('acr', float('nan')):.4f}",
        f"clean accuracy    {summary.get('clean_accuracy', float('nan')):.4f}",
        f"abstain rate      {summary.get('abstain_rate', float('nan')):.4f}",
        "certified accuracy at radius:",
    ]
    for r, v in summary.get("certified_accuracy", {}).items():
        lines.append(f"  r = {float(r):4.2f}      {v:.4f}")
    if "seconds_per_image" in summary:
        lines.append(f"seconds / image   {summary['seconds_per_image']:.3f}")
    if "samples_per_image" in summary:
        lines.append(f"samples / image   {summary['samples_per_image']:,.0f}")
    return "\n".join(lines)


def _recorded_labels(log):
    """The labels of the data set a certify log's summary records (settings dataset / split, trace data_root), to
    check its rows' labels against; None, with a warning, when that data set cannot be read here."""
    import warnings

    from . import data
    from .results import summary_paths

    try:
        summary = json.loads(summary_paths(log)[0].read_text())
        settings, trace = summary["settings"], summary.get("trace") or {}
        return data.load_dataset(settings["dataset"], trace.get("data_root"), settings["split"],
                                 image_size=settings.get("image_size"), labels_file=settings.get("val_labels"),
                                 classes=settings.get("val_classes"))[1]
    except Exception as exc:  # an older summary without a trace, data not on this machine
        warnings.warn(f"the rows' labels are not checked against their data set ({type(exc).__name__}: {exc})",
                      stacklevel=2)
        return None


def cmd_data(args) -> int:
    from .imagedata import ImageFolderData, pack

    src, out = Path(args.src), Path(args.out)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UsageError(f"{out} lies inside the images {src}: pack into another folder")
    ds = ImageFolderData(src, args.image_size, labels_file=args.val_labels, classes=args.val_classes)
    source = {"root": str(src.resolve()), "image_size": args.image_size, "layout": "imagenet-val" if args.val_labels
              else "imagefolder", **({"val_labels": str(Path(args.val_labels).resolve())} if args.val_labels else {})}
    index = pack(ds, out, shard_images=args.shard_images, source=source, progress=not args.quiet)
    print(f"wrote {out}: {index['count']} images {'x'.join(map(str, index['image_shape']))} in {len(index['shards'])} "
          f"shards, {len(index['classes'])} classes")
    return 0


def cmd_merge(args) -> int:
    from .results import merge_logs, summary_paths

    out = Path(args.out)
    _claim_outputs([out, *summary_paths(out)], [f for log in args.logs for f in (log, *summary_paths(log))],
                   overwrite=args.overwrite)

    summ = merge_logs(args.logs, args.out, allow_partial=args.allow_partial, overwrite=args.overwrite,
                      labels=_recorded_labels(args.logs[0]))  # errors: main()
    print(format_table(summ))
    print(f"wrote {args.out} ({summ['images']} images from {len(args.logs)} logs)")
    return 0


def load_model_arg(checkpoint, weights, arch, device) -> tuple[torch.nn.Module, dict]:
    """(model, its identity for a run's settings) of ``--checkpoint FILE`` (an engine checkpoint) or
    ``--weights FILE [--arch NAME]`` (an engine checkpoint, or a safetensors / PyTorch state_dict file given
    its architecture). The identity is the file's sha256, and for a file without the engine's header
    also the architecture it was read as. Errors: :class:`engine.models.CheckpointError`."""
    from . import models

    if checkpoint is not None:
        path = Path(checkpoint)
        try:
            models.read_meta(path)
        except models.CheckpointError as exc:
            if not path.is_file():
                raise
            raise models.CheckpointError(
                f"{exc}; --checkpoint takes the engine's own checkpoints: give other weights as --weights {path} --arch NAME"
            ) from None
        model = models.load(path, device=device)
    else:
        path = Path(weights)
        model = models.load(path, arch=arch, device=device)
    identity = {"checkpoint_sha256": sha256_file(path)}
    if model.engine_meta.get("format") is None:  # weights without the engine's header: read as this architecture
        identity["arch"] = {"name": model.engine_meta["arch"], "kwargs": model.engine_meta["arch_kwargs"]}
    return model, identity


def _selection(args, count: int, what: str) -> list[int]:
    """The images certify / predict take (Cohen et al.'s selection, then this shard's share); refuses an empty one."""
    indices = select_indices(count, args.skip, args.max, args.shard, args.num_shards)
    if not indices:
        shard = f", shard {args.shard} of {args.num_shards}" if args.num_shards > 1 else ""
        raise UsageError(f"the selection is empty: --skip {args.skip} --max {args.max}{shard} selects none of the "
                         f"{count} images of {what}")
    return indices


def _sigma_of(args, model, path) -> float:
    """--sigma, or the noise level recorded in the checkpoint; a different one than recorded prints a warning."""
    raw = (getattr(model, "engine_meta", {}).get("meta") or {}).get("sigma")
    valid = isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw > 0 and raw != float("inf")
    recorded = float(raw) if valid else None
    if args.sigma is None:
        if recorded is None:
            what = "records no noise level" if raw is None else f"records sigma {raw!r}, not a positive number"
            raise UsageError(f"--sigma is required: {path} {what}")
        return recorded
    if recorded is not None and args.sigma != recorded:
        import warnings

        warnings.warn(f"--sigma {args.sigma:g} differs from the sigma {recorded:g} recorded in {path} (the noise level "
                      f"the model was trained with); certifying at {args.sigma:g}", stacklevel=2)
    return args.sigma


def _check_backend(backend: str, device: torch.device) -> None:
    if backend == "triton":
        from engine.kernels._launch import can_run

        if not can_run(device):
            raise UsageError(f"--backend triton needs a CUDA device (or TRITON_INTERPRET=1 for the slow CPU "
                             f"interpreter); this run's device is {device}")


def _model_fits(model, images, labels, what: str) -> None:
    from .validate import check_model_fits

    check_model_fits(model, images[:1], labels=labels, name=what)


def _prepare_model_run(args, distributed: bool = False):
    """(device, model, identity, images, labels, indices, sigma, precision, path) of certify / predict; with
    ``distributed``, this process joins the process group of a torchrun launch first (its device: cuda:LOCAL_RANK)."""
    from . import data
    from .accel import resolve_precision

    device = _device(args.device)
    if distributed:
        device = _join_launch(device)
    _check_backend(args.backend, device)
    model, identity = load_model_arg(args.checkpoint, args.weights, args.arch, device)
    path = args.checkpoint or args.weights
    _check_image_args(args)
    images, labels = data.load_dataset(args.dataset, args.data_root, args.split, image_size=args.image_size,
                                       labels_file=args.val_labels, classes=args.val_classes)
    where = (f"the {args.dataset} {args.split} split" if args.dataset not in data.IMAGE_DATASETS
             else f"{args.dataset} {args.data_root}")
    indices = _selection(args, images.shape[0], where)
    _model_fits(model, images, labels[indices], f"model of {path}")
    sigma = _sigma_of(args, model, path)
    precision = resolve_precision(args.precision, device, args.backend)
    return device, model, identity, images, labels, indices, sigma, precision, path


def _check_image_args(args) -> None:
    """--image-size / --val-labels / --val-classes / --test-root / --test-dataset only where they apply."""
    from .data import IMAGE_DATASETS

    test_ds = getattr(args, "test_dataset", None)
    images = args.dataset in IMAGE_DATASETS
    if getattr(args, "image_size", None) is not None and not images:
        raise UsageError(f"--image-size applies to the image-folder data sets, not {args.dataset}")
    if hasattr(args, "test_root") and not images and (args.test_root is not None or test_ds is not None):
        raise UsageError(f"--test-root and --test-dataset apply to the image data sets; {args.dataset} certifies its "
                         "test split")
    labelled = "imagenet-val" in (args.dataset, test_ds if test_ds is not None else args.dataset)
    if (getattr(args, "val_labels", None) is not None or getattr(args, "val_classes", None) is not None) and not labelled:
        raise UsageError("--val-labels and --val-classes apply to the imagenet-val layout only"
                         + (" (--test-dataset imagenet-val)" if hasattr(args, "test_root") else ""))


# copies of the decoded training set a command holds at once (the set, its train / validation split; poison and
# evaluate --poison also a float32 copy of the whole split): materialise refuses a set these would not fit
_HELD_COPIES = {"train": 2.0, "poison": 6.0, "evaluate": 6.0}


def _open_images(args, split: str = "train"):
    """(images, labels) of train / poison / evaluate before any decoding: mnist / cifar10's split (tensors), or with
    an image data set an :class:`engine.imagedata.ImageView` of --data-root (``split`` "train") or of --test-root
    ("test", evaluate: checked against the training images' size and classes, all before anything is decoded)."""
    from . import data

    _check_image_args(args)
    if args.dataset not in data.IMAGE_DATASETS:
        return data.load_dataset(args.dataset, args.data_root, split)
    if split == "train":
        return data.load_dataset(args.dataset, args.data_root, split, image_size=args.image_size)
    name, root = args.test_dataset or args.dataset, args.test_root
    if root is None:
        raise UsageError(f"--dataset {args.dataset}: give --test-root, the {name} of the test images to certify "
                         "(an image data set has no test split of its own)")
    train_view, _ = data.load_dataset(args.dataset, args.data_root, "train", image_size=args.image_size)
    size = train_view.shape[-1]  # a folder decodes at the training images' size (a packed store's when not given)
    train_classes = list(getattr(train_view.dataset, "classes", []))
    classes = args.val_classes if args.val_classes is not None else (train_classes or None)
    images, labels = data.load_dataset(name, root, split, image_size=None if name == "packed" else size,
                                       labels_file=args.val_labels if name == "imagenet-val" else None,
                                       classes=classes if name == "imagenet-val" else None)
    if tuple(images.shape[1:]) != tuple(train_view.shape[1:]):
        raise UsageError(f"--test-root {root} holds {'x'.join(map(str, images.shape[1:]))} images but the training "
                         f"images are {'x'.join(map(str, train_view.shape[1:]))}: certify at the size the victim is "
                         "trained at (pack both at one --image-size)")
    test_classes = list(getattr(images.dataset, "classes", []))
    if train_classes and test_classes and train_classes != test_classes:
        raise UsageError(f"--test-root {root} has the classes {_brief_list(test_classes)} but --data-root "
                         f"{args.data_root} has {_brief_list(train_classes)}: the class indices would not match")
    return images, labels


def _decoded(args, opened, split: str = "train"):
    """:func:`_open_images`'s images decoded once into one uint8 tensor (:func:`engine.imagedata.materialise`; a set
    that this command's copies would not fit into this machine's memory is refused before decoding)."""
    from .imagedata import ImageView, materialise

    images, labels = opened
    if not isinstance(images, ImageView):
        return images, labels
    root = args.data_root if split == "train" else args.test_root
    copies = _HELD_COPIES.get(args.command, 2.0) if split == "train" else 1.0
    return materialise(images, f"{args.dataset if split == 'train' else args.test_dataset or args.dataset} {root}",
                       progress=not getattr(args, "quiet", True), copies=copies), labels


def _load_images(args, split: str = "train"):
    """(images uint8 tensor, labels) of train / poison / evaluate (:func:`_open_images`, then :func:`_decoded`)."""
    return _decoded(args, _open_images(args, split), split)


def _brief_list(names: list[str], limit: int = 4) -> str:
    return "[" + ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "") + "]"


def _trace(args, device, precision, path) -> dict:
    return {"command": args.command, "checkpoint": str(path), "dataset": args.dataset,
            "data_root": None if args.data_root is None else str(args.data_root), "backend": args.backend,
            "precision": precision, "device": str(device), "threads": torch.get_num_threads()}


def _sampling_args(args) -> dict:
    """certify's --sampling / --radii / --radius-tol, checked together (UsageError naming the clash)."""
    if args.sampling == "fixed" and (args.radii is not None or args.radius_tol is not None):
        given = "--radii" if args.radii is not None else "--radius-tol"
        raise UsageError(f"{given} applies to --sampling adaptive only (fixed sampling certifies every image with --n "
                         "samples)")
    if args.radii is not None and args.radius_tol is not None:
        raise UsageError("give --radii (decision mode: the largest grid radius certified) or --radius-tol (radius "
                         "mode), not both")
    return {"sampling": args.sampling, "radii": args.radii, "radius_tol": args.radius_tol, "noise": args.noise}


_JOINED: list[bool] = []  # the command joined a torchrun launch's group (and so leaves it)


def _leave_process_group() -> None:
    """Destroy the process group this command joined (a command that fails leaves it too); a group made by whoever
    called ``main`` is theirs."""
    import torch.distributed as dist

    if _JOINED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _JOINED.clear()


def _image_settings(args) -> dict:
    """What identifies an ImageNet-style data set in a run's settings (image size, labels file), {} for the others."""
    from .data import IMAGE_DATASETS

    if args.dataset not in IMAGE_DATASETS:
        return {}
    out = {"image_size": args.image_size or (None if args.dataset == "packed" else 224)}
    if args.val_labels is not None:
        out["val_labels"] = str(Path(args.val_labels).resolve())
    if args.val_classes is not None:
        out["val_classes"] = str(Path(args.val_classes).resolve())
    return {k: v for k, v in out.items() if v is not None}


def _join_launch(device: torch.device) -> torch.device:
    """Join a torchrun launch's process group; this rank's device. Ranks other than 0 keep warnings to themselves
    (rank 0 prints each once)."""
    import torch.distributed as dist

    from .distributed import init_from_env

    joined = not (dist.is_available() and dist.is_initialized())
    device = init_from_env(device)
    if joined:
        _JOINED.append(True)
    if _rank() != 0:
        import warnings

        warnings.simplefilter("ignore")
    return device


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _launch_world_size() -> int:
    from .distributed import env_world_size

    try:
        return env_world_size()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_certify(args) -> int:
    from .results import summary_paths

    adaptive = _sampling_args(args)  # before any work
    world = _launch_world_size()
    if world > 1 and args.num_shards > 1:
        raise UsageError(f"under torchrun ({world} processes) the processes share the images out among themselves: "
                         "drop --shard / --num-shards (those split a run by hand, to merge later)")
    out = Path(args.out)
    json_path, png_path = summary_paths(out)  # --out r.json / r.png: refused before any work
    model_file = args.checkpoint or args.weights
    # a distributed run's parts make it a resumed run (rank 0 may have stopped while writing OUT from them)
    fresh = args.overwrite or not (out.exists() or out.with_name(out.name + ".parts").is_dir())
    # a fresh log claims its summary and plot too: files of that name that are not this log's are not replaced
    _claim_outputs([out, json_path, png_path] if fresh else [out], [model_file], overwrite=args.overwrite or not fresh)
    device, model, identity, images, labels, indices, sigma, precision, path = _prepare_model_run(args, world > 1)
    settings = {
        "command": "certify",
        **identity,
        "dataset": args.dataset,
        "split": args.split,
        **_image_settings(args),
        "sigma": sigma,
        "n0": args.n0,
        "n": args.n,
        "alpha": args.alpha,
        "seed": args.seed,
        "skip": args.skip,
        "max": args.max,
        "shard": args.shard,
        "num_shards": args.num_shards,
    }
    if precision != "fp32":  # mixed precision changes the base classifier: a resume must use the same
        settings["precision"] = precision
    summ = run_certify(
        model,
        images,
        labels,
        indices,
        out,
        settings,
        sigma=sigma,
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        batch_size=args.noise_batch,
        seed=args.seed,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
        backend=args.backend,
        precision=precision,
        trace=_trace(args, device, precision, path),
        **adaptive,
    )
    if _rank() == 0:
        print(format_table(summ))
        print(_wrote(out, *summary_paths(out)))
    return 0


def _wrote(*paths) -> str:
    return "wrote " + ", ".join(str(p) for p in paths if Path(p).exists())


def cmd_predict(args) -> int:
    from .results import summary_paths

    out = None if args.out is None else Path(args.out)
    lock = None
    if out is not None:
        json_path, png_path = summary_paths(out)
        _claim_outputs([out, json_path], [args.checkpoint or args.weights], overwrite=args.overwrite)
        from .fileio import ExclusiveLock

        lock = ExclusiveLock(out).acquire()
    try:
        return _predict(args, out, lock)
    finally:
        if lock is not None:
            lock.release()


def _predict(args, out, lock) -> int:
    from tqdm.auto import tqdm

    from .data import to_float
    from .fileio import publish
    from .results import SCHEMA_VERSION, run_trace, summary_paths
    from .smoothing import predict

    device, model, identity, images, labels, indices, sigma, precision, path = _prepare_model_run(args)
    rows = []
    chunk = 64
    with tqdm(total=len(indices), unit="img", desc="predict", disable=args.quiet, dynamic_ncols=True) as bar:
        for start in range(0, len(indices), chunk):
            ids = torch.tensor(indices[start : start + chunk])
            t0 = time.perf_counter()
            pred = predict(model, to_float(images[ids]), sigma=sigma, n=args.n, alpha=args.alpha,
                           batch_size=args.noise_batch, seed=args.seed, image_ids=ids, backend=args.backend,
                           precision=precision, progress=False, noise=args.noise)
            dt = (time.perf_counter() - t0) / len(ids)
            rows += [(int(i), int(labels[i]), int(p), dt) for i, p in zip(ids.tolist(), pred.tolist())]
            bar.update(len(ids))
    correct = sum(r[1] == r[2] for r in rows)
    abstain = sum(r[2] == -1 for r in rows)
    summary = {
        "schema_version": SCHEMA_VERSION,
        "settings": {"command": "predict", **identity, "dataset": args.dataset, "split": args.split,
                     **_image_settings(args), "sigma": sigma,
                     "n": args.n, "alpha": args.alpha, "seed": args.seed, "skip": args.skip, "max": args.max,
                     "shard": args.shard, "num_shards": args.num_shards,
                     **({"noise": args.noise} if args.noise != "gaussian" else {})},
        "trace": run_trace(**_trace(args, device, precision, path)),
        "images": len(rows),
        "accuracy": correct / len(rows),
        "abstain_rate": abstain / len(rows),
        "seconds_per_image": sum(r[3] for r in rows) / len(rows),
    }
    print(f"images            {len(rows)}\nsmoothed accuracy {summary['accuracy']:.4f}\n"
          f"abstain rate      {summary['abstain_rate']:.4f}\nseconds / image   {summary['seconds_per_image']:.3f}")
    if out is not None:
        json_path = summary_paths(out)[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("idx\tlabel\tpredict\tcorrect\ttime\n" +
                       "".join(f"{i}\t{y}\t{p}\t{int(p == y)}\t{t:.4f}\n" for i, y, p, t in rows))
        publish(tmp, out)
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        publish(tmp, json_path)
        png_path = summary_paths(out)[1]
        if png_path.exists():  # the plot of a certify log this table replaced (--overwrite)
            png_path.unlink()
        print(_wrote(out, json_path))
    return 0


def cmd_plot(args) -> int:
    from .plots import Run, plot_certified_accuracy

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"--out {out}: give a .png, .pdf or .svg file")
    if args.label is not None and len(args.label) != len(args.runs):
        raise UsageError(f"--label given {len(args.label)} times for {len(args.runs)} runs: give one per run, in order")
    _claim_outputs([out], args.runs, overwrite=args.overwrite)  # not one of the runs; an existing figure: --overwrite
    labels = args.label or [None] * len(args.runs)
    try:  # a missing or damaged log, a run without images: ValueError naming it
        runs = [Run.from_log(r, label=lab) for r, lab in zip(args.runs, labels)]
        plot_certified_accuracy(runs, out, title=args.title)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {out} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    return 0


def cmd_demo(args) -> int:
    from . import data, models, train

    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    if out_dir.is_file():
        raise UsageError(f"--out-dir {out_dir} is a file: give a folder")
    summary = out_dir / "certify.json"
    if summary.exists():  # the demo replaces its own outputs, never another command's
        try:
            command = json.loads(summary.read_text())["settings"]["command"]
        except (OSError, ValueError, KeyError, TypeError):
            command = None
        if command != "demo":
            raise UsageError(f"--out-dir {out_dir} holds the results of another command ({summary}); give another "
                             "--out-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    root = data.embedded_mnist_root()
    train_x, train_y = data.load_mnist(root, "train")
    test_x, test_y = data.load_mnist(root, "test")
    print(f"embedded MNIST subset: {train_x.shape[0]} train / {test_x.shape[0]} test images ({root})")
    device = _device(args.device)
    ckpt = out_dir / "lenet_gaussian.safetensors"
    model = models.lenet_mnist().to(device)
    t0 = time.perf_counter()
    _, history = train(
        model,
        (train_x, train_y),
        method="gaussian",
        sigma=args.sigma,
        epochs=args.epochs,
        batch_size=64,
        lr=0.05,
        seed=args.seed,
        eval_data=(test_x, test_y),
        log=lambda e: print(
            f"epoch {e['epoch']}: loss {e['loss']:.4f} train acc {e['accuracy']:.4f} "
            f"test acc {e['eval_accuracy']:.4f} noisy test acc {e['eval_noisy_accuracy']:.4f} ({e['seconds']:.1f}s)"
        ),
    )
    models.save(
        model,
        ckpt,
        method="gaussian",
        sigma=args.sigma,
        epochs=args.epochs,
        dataset="mnist-embedded",
        history=history,
        train_seconds=time.perf_counter() - t0,
    )
    indices = select_indices(test_x.shape[0], 1, args.images)
    settings = {
        "command": "demo",
        "checkpoint_sha256": sha256_file(ckpt),
        "dataset": "mnist-embedded",
        "split": "test",
        "sigma": args.sigma,
        "n0": args.n0,
        "n": args.n,
        "alpha": args.alpha,
        "seed": args.seed,
        "images": args.images,
    }
    summ = run_certify(
        model,
        test_x,
        test_y,
        indices,
        out_dir / "certify.tsv",
        settings,
        sigma=args.sigma,
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        batch_size=None,
        seed=args.seed,
        overwrite=True,
        show_progress=not args.quiet,
        trace={"command": "demo", "checkpoint": str(ckpt), "dataset": "mnist-embedded", "data_root": str(root),
               "backend": "auto", "precision": "fp32", "device": str(device), "threads": torch.get_num_threads()},
    )
    print(
        f"\nLeNet, Gaussian augmentation sigma={args.sigma}, {args.epochs} epochs; certify n0={args.n0} "
        f"n={args.n} alpha={args.alpha} on {args.images} test images"
    )
    print(format_table(summ))
    print(f"\nwrote {ckpt}, {out_dir / 'certify.tsv'}, {out_dir / 'certify.json'}, {out_dir / 'certify.png'}")
    return 0


def train_checkpoint_path(out: str | Path) -> Path:
    """The per-epoch checkpoint beside a ``train --out`` model: model.safetensors -> model.checkpoint.safetensors."""
    out = Path(out)
    return out.with_name(out.name[: -len(out.suffix)] + ".checkpoint" + out.suffix if out.suffix else out.name + ".checkpoint")


TRAIN_METHOD_FLAGS = ("eps", "steps", "m", "warmup", "k", "beta", "gamma", "lbd", "lbd_warmup")


def cmd_train(args) -> int:
    from . import models
    from .data import IMAGE_DATASETS
    from .train import progress_bar, train

    device = _device(args.device)
    out = Path(args.out)
    ckpt = train_checkpoint_path(out)
    if ckpt.exists() and not (args.resume or args.overwrite):
        raise UsageError(f"{ckpt} exists; pass --resume to continue that run or --overwrite to start again")
    # --resume continues from the checkpoint if there is one (the same command again after a crash), else starts;
    # the model file may exist only as the result of the run being resumed
    _claim_outputs([out, ckpt], [args.weights], overwrite=args.overwrite or (args.resume and ckpt.exists()))
    _writable_folder(out)
    images, labels = _load_images(args, "train")
    (train_x, train_y), val = _split(images, labels, args.val_size, args.train_size, args.dataset)
    torch.manual_seed(args.seed)  # weight initialisation
    if args.weights is None:
        model = models.build(args.arch).to(device)
    else:  # start from given weights (a resume of a run started from other weights is refused)
        model = models.load(args.weights, arch=args.arch, device=device)
    _model_fits(model, train_x, train_y, f"--arch {args.arch}")
    method_args = {k: getattr(args, k) for k in TRAIN_METHOD_FLAGS if getattr(args, k) is not None}
    progress, close_bar = (False, lambda: None) if args.quiet else progress_bar(train_x.shape[0])

    def log(e):
        text = f"epoch {e['epoch']}: loss {e['loss']:.4f} acc {e['accuracy']:.4f} ({e['seconds']:.1f}s"
        text += f", {train_x.shape[0] / e['seconds']:,.0f} img/s)"
        if "eval_accuracy" in e:
            text += f" val acc {e['eval_accuracy']:.4f} noisy val acc {e['eval_noisy_accuracy']:.4f}"
        print(text, flush=True)

    settings = {
        "method": args.method,
        "method_args": method_args,
        "sigma": args.sigma,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "schedule": args.schedule,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
    }
    if args.weights is not None:
        settings["init_weights"] = sha256_file(Path(args.weights))
    try:
        _, history = train(
            model,
            (train_x, train_y),
            eval_data=val,
            log=log,
            progress=progress,
            checkpoint=ckpt,
            resume=args.resume,
            stop_after_epoch=args.stop_after_epoch,
            checkpoint_seconds=None if args.checkpoint_minutes == 0 else 60.0 * args.checkpoint_minutes,
            **{k: v for k, v in settings.items() if k != "method_args"},
            **method_args,
        )
    except ValueError as exc:
        close_bar()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(history) < args.epochs:
        print(f"stopped after epoch {len(history)} of {args.epochs}; continue with --resume (checkpoint {ckpt})")
        return 0
    models.save(
        model,
        out,
        **settings,
        arch=args.arch,
        dataset=args.dataset,
        data_root=None if args.data_root is None else str(args.data_root),
        **({"image_size": int(train_x.shape[-1])} if args.dataset in IMAGE_DATASETS else {}),
        train_size=int(train_x.shape[0]),
        val_size=args.val_size,
        history=history,
        train_seconds=sum(e["seconds"] for e in history),
        checkpoint_sha256=sha256_file(ckpt),
        **({} if args.weights is None else {"init_weights_file": str(args.weights)}),
    )
    print(f"wrote {out} (checkpoint {ckpt})")
    return 0


def cmd_make_subset(args) -> int:
    from . import data

    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and src.exists() and _same_file(src, dst):
        raise UsageError(f"--dst {dst} is the --src folder: the subset would replace its source")
    if dst.is_file():
        raise UsageError(f"--dst {dst} is a file: give a folder")
    if dst.is_dir() and any(dst.iterdir()) and not args.overwrite:
        raise UsageError(f"--dst {dst} is not empty; pass --overwrite to write the subset into it")
    for split, want in (("train", args.train), ("test", args.test)):
        have = data.load_mnist(src, split)[0].shape[0]
        if want > have:
            raise UsageError(f"--{split} {want}: {src} holds {have} {split} images")

    info = data.cut_mnist_subset(args.src, args.dst, n_train=args.train, n_test=args.test, seed=args.seed)
    print(json.dumps(info, indent=2))
    return 0


def _split(images, labels, val_size: int, train_size: int | None, dataset: str):
    from .data import split_validation

    try:
        return split_validation(images, labels, val_size, train_size)
    except ValueError as exc:
        sizes = f"--val-size {val_size}" + ("" if train_size is None else f" + --train-size {train_size}")
        raise UsageError(f"{sizes}: more than the {images.shape[0]} training images of {dataset} ({exc})") from None


def _load_split(args):
    images, labels = _load_images(args, "train")
    return _split(images, labels, args.val_size, None, args.dataset)


def _method_args(args, method: str, victim: bool = False) -> dict:
    """--method-args as a dict, checked against the procedure (the poison's lower level, or a victim's training)."""
    if args.method_args is None:
        return {}
    try:
        value = json.loads(args.method_args)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--method-args must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError("--method-args must be a JSON object, e.g. '{\"k\": 2}'")
    try:
        from .train import _method_args as check_values

        if not victim:  # the poison's lower level: its own keys, with the values the training procedures accept
            from .pacd import _method_args as check_keys

            check_keys(method, value)
            check_values(method, {**({"eps": 0.5} if method == "smoothadv" else {}), **value})
        else:
            check_values(method, value)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--method-args {args.method_args}: {exc}") from None
    return value


def _check_target_class(target_class: int, labels: torch.Tensor, dataset: str) -> None:
    classes = int(labels.max()) + 1 if labels.numel() else 0
    if not 0 <= target_class < classes:
        raise UsageError(f"--target-class {target_class}: {dataset} has classes 0..{classes - 1}")


_PRESET_OPTION = {"a": "--upper-alpha", "k": "--upper-k", "beta": "--upper-beta"}  # preset key -> option


def _apply_preset(args) -> dict:
    """Fill the poison options a --preset sets and the command line does not give; {} without a preset, else the
    preset's name and the options given beside it (recorded in the poison's settings)."""
    if args.preset is None:
        missing = [f"--{k.replace('_', '-')}" for k in ("sigma", "eps", "outer_steps") if getattr(args, k) is None]
        if missing:
            raise UsageError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (or --preset "
                             f"{' / '.join(PRESETS)})")
        return {}
    values = preset(args.preset, args.method)
    given = getattr(args, "given_options", set())
    overrides = {}
    for key, value in values.items():
        option = _PRESET_OPTION.get(key, "--" + key.replace("_", "-"))
        dest = option[2:].replace("-", "_")
        if option in given:
            overrides[key] = getattr(args, dest)
        else:
            setattr(args, dest, json.dumps(value) if key == "method_args" else value)
    return {"preset": args.preset, "preset_overrides": overrides}


def cmd_poison(args) -> int:
    from . import models
    from .data import IMAGE_DATASETS
    from .pacd import PoisonSet, poison

    preset_record = _apply_preset(args)
    out = Path(args.out)
    ckpt = out.with_name(out.name + ".ckpt")
    if ckpt.exists() and not args.resume:
        raise UsageError(f"{ckpt} exists: pass --resume to continue that run, or remove it")
    if out.exists() and not ckpt.exists():  # (--resume without a checkpoint starts the run)
        raise UsageError(f"{out} exists: give another --out"
                         + (f", continue crafting from it with --init {out} --out NEW," if out.is_file() else "")
                         + " or remove it")
    _claim_outputs([out, ckpt], [args.init], overwrite=True)
    _writable_folder(out)
    device = _device(args.device)
    world = _launch_world_size()
    if world > 1:  # under torchrun: data-parallel crafting, rank 0 writes the checkpoint and the poison
        device = _join_launch(device)
    margs = _method_args(args, args.method)
    train_data, val_data = _load_split(args)
    _check_target_class(args.target_class, train_data[1], args.dataset)
    _model_fits(models.build(args.arch), train_data[0], train_data[1], f"--arch {args.arch}")
    init = PoisonSet.load(args.init, train_data) if args.init is not None else None  # a bad file: PoisonError naming it

    def log(entry):
        if args.log_every and entry["step"] % args.log_every == 0 and (world == 1 or _rank() == 0):
            print(json.dumps(entry), file=sys.stderr, flush=True)

    ps = poison(
        lambda: models.build(args.arch),
        train_data,
        val_data,
        target_class=args.target_class,
        method=args.method,
        sigma=args.sigma,
        eps=args.eps,
        solver=args.solver,
        outer_steps=args.outer_steps,
        niter1=args.niter1,
        niter2=args.niter2,
        lr_u=args.lr_u,
        lr_w=args.lr_w,
        lr_p=args.lr_p,
        damping=args.damping,
        reset_every=args.reset_every,
        batch_clean=args.batch_clean,
        batch_poison=args.batch_poison,
        batch_val=args.batch_val,
        k=args.upper_k,
        beta=args.upper_beta,
        a=args.upper_alpha,
        u_update=args.u_update,
        seed=args.seed,
        checkpoint=ckpt,
        checkpoint_every=args.checkpoint_every,
        checkpoint_seconds=60.0 * args.checkpoint_minutes,
        init=init,
        method_args=margs,
        device=device,
        progress=not args.quiet,
        log=log,
        lower_subset=args.lower_subset,
    )
    if _rank() != 0:
        return 0
    ps.settings.update({"arch": args.arch, "dataset": args.dataset, "val_size": args.val_size, **preset_record})
    if args.dataset in IMAGE_DATASETS:
        ps.settings["image_size"] = int(train_data[0].shape[-1])
    crafted, ps = ps, ps.encode(train_data, args.encoding)  # the poison the file holds (int8: quantised, a new poison)
    ps.save(out)
    print(f"wrote {out}: {len(ps)} poisoned images of class {ps.target_class}, L_inf {ps.linf(train_data):.4f} <= eps {ps.eps}"
          f"{_encoding_note(crafted, ps, out)}")
    if args.keep_checkpoint:
        print(f"kept the checkpoint {ckpt}")
    elif ckpt.exists():  # the poison is written: its run's checkpoint is litter (--keep-checkpoint keeps it)
        ckpt.unlink()
    return 0


def _encoding_note(source, ps, path) -> str:
    """', ENCODING[ (quantised: ...)], N bytes' (``ps`` = ``source.encode(...)``) for the poison commands' messages."""
    q = ps.settings.get("quantized")
    lossy = q is not None and q != source.settings.get("quantized")
    what = f" (quantised: {q['changed_pixels']} pixels moved, by at most {q['max_abs_change']:.3g})" if lossy else ""
    return f", {ps.encoding}{what}, {Path(path).stat().st_size:,} bytes"


def cmd_poison_snapshot(args) -> int:
    from .pacd import PoisonSet

    _claim_outputs([args.out], [args.checkpoint], overwrite=args.overwrite)
    train_data, _ = _load_split(args)
    ps = PoisonSet.from_checkpoint(args.checkpoint, train_data)
    ps.settings.update({"dataset": args.dataset, "val_size": args.val_size})
    snap, ps = ps, ps.encode(train_data, args.encoding)
    ps.save(args.out)
    print(
        f"wrote {args.out}: the poison of {args.checkpoint} after {ps.settings['outer_steps']} outer steps, "
        f"{len(ps)} images of class {ps.target_class}, L_inf {ps.linf(train_data):.4f} <= eps {ps.eps}"
        f"{_encoding_note(snap, ps, args.out)}"
    )
    return 0


def cmd_poison_combine(args) -> int:
    from .pacd import PoisonSet, combine_poisons

    if args.how == "mean" and len(args.poisons) < 2:
        print(f"error: poison-combine --how mean needs two or more poison files, got {len(args.poisons)}", file=sys.stderr)
        return 2
    _claim_outputs([args.out], args.poisons, overwrite=args.overwrite)
    for i, a in enumerate(args.poisons):
        for b in args.poisons[:i]:
            if _same_file(Path(a), Path(b)):
                raise UsageError(f"{a} is given twice (also as {b}): each poison once")
    train_data, _ = _load_split(args)
    parts = [PoisonSet.load(path, train_data) for path in args.poisons]
    ps = combine_poisons(parts, train_data, args.how, mixed_methods=args.mixed_methods)
    ps.settings.update({"dataset": args.dataset, "val_size": args.val_size})
    encoding = {"vote": "sign", "mean": "int8"}[args.how] if args.encoding == "auto" else args.encoding
    combined, ps = ps, ps.encode(train_data, encoding)  # a vote is a vertex poison: sign is lossless; a mean is quantised
    ps.save(args.out)
    inputs = f"{len(parts)} poison{'s' if len(parts) > 1 else ''}"
    print(f"wrote {args.out}: {args.how} of {inputs}, {len(ps)} images of class {ps.target_class}, "
          f"L_inf {ps.linf(train_data):.4f} <= eps {ps.eps}{_encoding_note(combined, ps, args.out)}")
    return 0


def cmd_poison_encode(args) -> int:
    from .pacd import PoisonSet

    if args.snap and args.encoding != "sign":
        print(f"error: --snap moves a poison to a vertex for --encoding sign, not {args.encoding}", file=sys.stderr)
        return 2
    _claim_outputs([args.out], [args.poison], overwrite=args.overwrite)
    in_bytes = Path(args.poison).stat().st_size if Path(args.poison).is_file() else 0
    train_data, _ = _load_split(args)
    src = PoisonSet.load(args.poison, train_data)
    ps = src.encode(train_data, args.encoding, snap=args.snap)
    ps.save(args.out)
    what = "the same poison" if ps.settings == src.settings else "a new poison"
    print(f"wrote {args.out}: {args.poison} ({src.encoding}, {in_bytes:,} bytes) as "
          f"{what}{_encoding_note(src, ps, args.out)}")
    return 0


def cmd_poison_random(args) -> int:
    from .pacd import PoisonSet, random_poison

    if (args.kind == "twin") != (args.like is not None):
        raise UsageError("--kind twin takes --like POISON (the crafted poison whose magnitudes it keeps); "
                         "the other kinds take no --like")
    _claim_outputs([args.out], [args.like], overwrite=args.overwrite)
    train_data, _ = _load_split(args)
    like = PoisonSet.load(args.like, train_data) if args.like is not None else None
    target = like.target_class if like is not None else args.target_class
    eps = like.eps if like is not None else args.eps
    if target is None or eps is None:
        raise UsageError(f"--kind {args.kind} needs --target-class and --eps")
    if like is not None and ((args.target_class not in (None, target)) or (args.eps not in (None, eps))):
        raise UsageError(f"--like {args.like} is a poison of class {target} at eps {eps}: leave out --target-class "
                         "and --eps or give those")
    _check_target_class(target, train_data[1], args.dataset)
    ps = random_poison(train_data, target_class=target, eps=eps, kind=args.kind, seed=args.seed, like=like)
    ps.settings.update({"dataset": args.dataset, "val_size": args.val_size})
    encoding = args.encoding if args.encoding != "auto" else ("sign" if args.kind in ("vertex", "sign", "shift")
                                                               else "int8")
    made, ps = ps, ps.encode(train_data, encoding)
    ps.save(args.out)
    print(f"wrote {args.out}: {args.kind} control of {len(ps)} images of class {ps.target_class}, L_inf "
          f"{ps.linf(train_data):.4f} <= eps {ps.eps}{_encoding_note(made, ps, args.out)}")
    return 0


COMPARE_KEYS = ("victim_method", "arch", "sigma", "target_class", "images", "n", "poisoned", "acr",
                "certified_accuracy", "clean_accuracy_other_classes")


def _controls(text: str) -> tuple[str, ...]:
    """--controls: a comma-separated list of control kinds, or none."""
    if text.strip().lower() == "none":
        return ()
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in CONTROLS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"must be 'none' or a comma-separated list of {', '.join(CONTROLS)}, got {text!r}")
    return kinds


def cmd_evaluate(args) -> int:
    from . import models
    from .evaluate import (
        _pair_key,
        control_differences,
        evaluate_poison,
        evaluate_with_controls,
        format_control_differences,
        format_rows,
    )
    from .pacd import PoisonSet

    if (args.poison is None) == (not args.clean):
        raise UsageError("give exactly one of --poison FILE or --clean")
    if args.clean and args.target_class is None:
        raise UsageError("--clean needs --target-class (the class whose test images are certified)")
    earlier = []
    for d in args.compare:
        summary = Path(d) / "summary.json"
        try:
            loaded = json.loads(summary.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--compare {d}: cannot read {summary} ({exc})") from None
        missing = [k for k in COMPARE_KEYS if not isinstance(loaded, dict) or k not in loaded]
        if missing:
            raise UsageError(f"--compare {d}: {summary} is not an evaluation summary (missing {missing})")
        earlier.append((d, loaded))
    device = _device(args.device)
    margs = _method_args(args, args.victim_method, victim=True)
    test_opened = _open_images(args, "test")  # test-side mistakes are refused before the training set is decoded
    train_data, _ = _load_split(args)
    ps = PoisonSet.load(args.poison, train_data) if args.poison else None  # compact files decode from the originals
    if args.target_class is not None:
        _check_target_class(args.target_class, train_data[1], args.dataset)
    test_data = _decoded(args, test_opened, "test")
    _model_fits(models.build(args.arch), train_data[0], train_data[1], f"--arch {args.arch}")
    kwargs = dict(
        victim_method=args.victim_method,
        arch=args.arch,
        sigma=args.sigma,
        target_class=args.target_class,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        schedule=args.schedule,
        seed=args.seed,
        method_args=margs,
        n_images=args.images,
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        batch=args.noise_batch,
        init_weights=args.weights,
        device=device,
        dataset=args.dataset,
        progress=not args.quiet,
    )
    controls = args.controls if ps is not None and not ps.method.startswith("control:") else ()
    if controls:
        out = evaluate_with_controls(ps, train_data, test_data, out_dir=args.out_dir, controls=controls,
                                     control_seed=args.control_seed, **kwargs)
        res, ctrl = out["poisoned"], out["controls"]
    else:
        res, ctrl = evaluate_poison(ps, train_data, test_data, out_dir=args.out_dir, **kwargs), {}
    print(format_rows([s for _, s in earlier] + [res] + list(ctrl.values())))
    clean_dir = next((d for d, s in earlier if not s["poisoned"] and _pair_key(s) == _pair_key(res)), None)
    if ctrl and clean_dir is not None:
        print("\n" + format_control_differences(control_differences(clean_dir, args.out_dir, out["control_dirs"])))
    elif ctrl:
        print(f"\n(give the clean victim's directory with --compare to see the poison against its controls: "
              f"{', '.join(ctrl)})")
    return 0


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = _number(text, "a finite number > 0")
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _radii_list(text: str) -> list[float]:
    """--radii: comma-separated distinct finite radii >= 0, e.g. 0,0.25,0.5."""
    parts = [t for t in text.split(",") if t.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of radii >= 0, got {text!r}")
    values = [_nonnegative_float(t.strip()) for t in parts]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"must not repeat a radius, got {text!r}")
    return sorted(values)


def _nonnegative_float(text: str) -> float:
    value = _number(text, "a finite number >= 0")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _unit_interval(text: str) -> float:
    value = _number(text, "a number in (0, 1)")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def _eps_budget(text: str) -> float:
    value = _number(text, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1] (pixels are in [0, 1]), got {text}")
    return value


def _int_at_least(lo: int, hi: int | None = None, why: str = ""):
    """An integer in [lo, hi]; scientific notation of an integer (1e5) is accepted."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                f = float("nan")
            if not (f == f and abs(f) != float("inf") and f.is_integer()):
                raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
            value = int(f)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be an integer <= {hi:,}{why}, got {text}")
        return value

    return parse


_SAMPLES = _int_at_least(1, 2**32, " (samples per image of the noise stream)")


def _out_path(text: str) -> str:
    """An output file's name: not empty, not a folder, and no file where a folder of its path should be."""
    if not text or text.endswith(("/", os.sep)) or Path(text).name in ("", ".", ".."):
        raise argparse.ArgumentTypeError(f"must name a file, got {text!r}")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory: give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{parent} is a file, not a folder, so {text} cannot be written")
            break
    return text


def _writable_folder(path: Path) -> None:
    """The folder an output goes to exists (made now) and can be written, before a long run."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot make the folder {folder} for {path}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write to the folder {folder} (for {path})")


def _max_index(text: str) -> int:
    """--max: -1 (all) or a stop index >= 1."""
    value = _int_at_least(-1)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be -1 (all images) or an index >= 1: --max 0 selects no image")
    return value


def _device_name(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (checked against this machine when the command runs)."""
    import re

    if text in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")


def _arch_name(text: str) -> str:
    """--arch: a name engine.models.build knows (zoo, torchvision.<model>, registered)."""
    from .models import _resolve

    try:
        _resolve(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


ARCH_HELP = ("lenet, mlp, resnet20, resnet110, torchvision.<model> (e.g. torchvision.resnet18; needs "
             "pip install pacd-engine[vision]) or a name given to engine.models.register")


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (options without one, flags and required options excepted)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "%(default)" not in text and action.default is not None
                and action.default is not False and action.default is not argparse.SUPPRESS and not action.required):
            text += " (default: %(default)s)"
        return text


class _Renamed(argparse.Action):
    """A former option name: using it is an error naming the option that replaced it."""

    def __init__(self, option_strings, dest, new: str = "", meaning: str = "", **kw):
        kw.update(nargs="?", help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kw)
        self.new, self.meaning = new, meaning

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed {self.new} ({self.meaning}): one name, one meaning in every command")


def _noise_batch(p) -> None:
    p.add_argument("--noise-batch", type=_int_at_least(1), default=None, metavar="SAMPLES",
                   help="noisy samples per forward pass (default: about 1 MiB of input on a CPU, 64 MiB on a GPU); "
                   "results do not depend on it")
    p.add_argument("--batch", action=_Renamed, new="--noise-batch", meaning="noisy samples per forward pass")


def _batch_size(p, default: int, renamed: bool = True) -> None:
    p.add_argument("--batch-size", type=_int_at_least(1), default=default, metavar="IMAGES",
                   help="training images per step (SmoothAdv and MACER run m or k noisy copies of each)")
    if renamed:  # (evaluate's former --batch was the noise batch)
        p.add_argument("--batch", action=_Renamed, new="--batch-size", meaning="training images per step")


def _add_threads(p) -> None:
    p.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch CPU threads (default: torch's; 1 on a machine shared with other jobs)")


def _add_device(p, default: str = "auto") -> None:
    p.add_argument("--device", type=_device_name, default=default,
                   help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")


def _add_quiet(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


TRAINING_IMAGE_DATASETS = ("imagefolder", "packed")  # what train / poison / evaluate train on besides mnist, cifar10


def _add_dataset(p, required: bool = False, root_help: str = "data folder", images: bool = False,
                 training: bool = False, test: bool = False) -> None:
    """--dataset / --data-root; with ``images`` also the ImageNet-style data sets, --image-size and --val-labels (the
    data of certify / predict); with ``training`` the image folders and packed stores a model is trained on, and
    --image-size; with ``test`` (evaluate) --test-root / --test-dataset and --val-labels for the test images."""
    from .data import IMAGE_DATASETS

    extra = IMAGE_DATASETS if images else TRAINING_IMAGE_DATASETS if training else ()
    choices = ("mnist", "cifar10") + extra
    help_ds = ("data set: mnist, cifar10, imagefolder (class folders of images), imagenet-val (one folder and "
               "--val-labels), packed (a store written by 'data pack')") if images else (
               "data set: mnist, cifar10, imagefolder (class folders of images, decoded once into memory), packed "
               "(a store written by 'data pack')") if training else "data set"
    p.add_argument("--dataset", choices=choices, required=required, **({} if required else {"default": "mnist"}),
                   help=help_ds)
    p.add_argument("--data-root", default=None,
                   help=f"{root_help} (default: mnist: the MNIST subset shipped in the package; others: required)")
    if images or training:
        p.add_argument("--image-size", type=_int_at_least(1), default=None,
                       help="imagefolder / imagenet-val: centre crop size after resizing the shorter side to size/0.875 "
                       "(default 224: resize 256, crop 224); packed: must match the store")
    if test:
        p.add_argument("--test-root", default=None,
                       help="with an image data set: the folder (or packed store) of the test images certified; "
                       "mnist / cifar10 use their test split")
        p.add_argument("--test-dataset", choices=IMAGE_DATASETS, default=None,
                       help="kind of --test-root (default: --dataset's): imagefolder, imagenet-val (one folder and "
                       "--val-labels; class names numbered by the training folder), packed")
    if images or test:
        p.add_argument("--val-labels", default=None,
                       help="imagenet-val: text file of '<file name> <label>' lines (a 0-based class index or a name)")
        p.add_argument("--val-classes", default=None,
                       help="imagenet-val with class names: the training folder of class folders (or a file of names in "
                       "order) that numbers them" + (" (default with --dataset imagefolder: --data-root)" if test
                                                      else ""))


def _add_poison_split(p, whose: str) -> None:
    """--dataset / --data-root / --val-size of the training split a poison was crafted on, and --out."""
    _add_dataset(p, root_help=f"data folder of {whose}", training=True)
    p.add_argument("--val-size", type=_int_at_least(1), default=5000, help=f"{whose}'s --val-size")
    p.add_argument("--out", type=_out_path, required=True, help="poison .safetensors to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _add_certify_args(p, *, n_default: int = 100_000, sigma_help: str | None = None) -> None:
    """The certification settings shared by certify, predict and evaluate."""
    if sigma_help is not None:
        p.add_argument("--sigma", type=_positive_float, default=None, help=sigma_help)
    p.add_argument("--n0", type=_SAMPLES, default=100, help="selection samples per image (CERTIFY's first stage)")
    p.add_argument("--n", type=_SAMPLES, default=n_default, help="estimation samples per image (1e5 is accepted)")
    p.add_argument("--alpha", type=_unit_interval, default=0.001, help="failure probability of each certificate")
    _noise_batch(p)


def build_parser(prog: str = "python -m engine") -> argparse.ArgumentParser:
    from ._version import __version__

    common = dict(formatter_class=_HelpFormatter, allow_abbrev=False)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], **common)
    parser.add_argument("--version", action="version", version=f"pacd-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str):
        return sub.add_parser(name, help=help, description=help, **common)

    # -- certify / predict -------------------------------------------------------------------------
    for name in ("certify", "predict"):
        if name == "certify":
            p = command("certify", "certify a model over a data set (resumable TSV log + JSON summary + PNG plot)")
        else:
            p = command("predict", "predict with the smoothed classifier over a data set (Cohen et al.'s PREDICT; "
                        "TSV + JSON, abstentions as -1)")
        _add_threads(p)
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--checkpoint", help="model .safetensors written by engine.models.save")
        g.add_argument("--weights", help="model weights: an engine checkpoint, or (with --arch) a safetensors file or a "
                       "PyTorch state_dict (torch.save(model.state_dict(), F); read with weights_only=True, never "
                       "unpickled)")
        p.add_argument("--arch", type=_arch_name, default=None, help=f"architecture of --weights: {ARCH_HELP}")
        _add_dataset(p, required=True, images=True)
        p.add_argument("--split", choices=("train", "test"), default="test",
                       help="which split of mnist / cifar10 (an image folder or packed store is its own split)")
        _add_certify_args(p, n_default=100_000 if name == "certify" else 10_000,
                          sigma_help="noise level (default: the sigma recorded in the checkpoint; a different one "
                          "prints a warning)")
        p.add_argument("--skip", type=_int_at_least(1), default=1, help="take every skip-th image")
        p.add_argument("--max", type=_max_index, default=-1, help="stop before this index (-1: all images)")
        p.add_argument("--shard", type=_int_at_least(0), default=0, help="this shard's number (0-based)")
        p.add_argument("--num-shards", type=_int_at_least(1), default=1,
                       help="split the selected images into this many shards (merge their logs with merge)")
        p.add_argument("--seed", type=_int_at_least(0), default=0, help="key of the noise stream")
        p.add_argument("--backend", choices=("auto", "torch", "cpp", "triton"), default="auto",
                       help="sampling path: auto (triton on CUDA, else the extension's CPU path), torch (plain loop), "
                       "cpp (the extension's noise op), triton (CUDA, or TRITON_INTERPRET=1)")
        p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="auto: bf16 with the auto/triton backends on CUDA, fp32 otherwise")
        p.add_argument("--noise", choices=("gaussian", "discrete"), default="gaussian",
                       help="gaussian (Cohen et al.) or discrete: sound noise on the 8-bit pixel grid, certificates "
                       "immune to float rounding (docs/sound_noise.md)")
        _add_device(p)
        if name == "certify":
            p.add_argument("--out", type=_out_path, required=True, help="per-image log .tsv (its summary .json and plot .png are "
                           "written beside it: r.tsv -> r.json, r.png); an existing log is resumed")
            p.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
            p.add_argument("--sampling", choices=("fixed", "adaptive"), default="fixed",
                           help="fixed: Cohen et al.'s n samples per image; adaptive: samples in looks up to --n, each "
                           "image stopping once settled, same guarantee (docs/adaptive_sampling.md)")
            p.add_argument("--radii", type=_radii_list, default=None,
                           help="adaptive decision mode: grid radii, e.g. 0,0.25,0.5,0.75 (radius = the largest certified)")
            p.add_argument("--radius-tol", type=_positive_float, default=None,
                           help="adaptive radius mode: stop when the radius cannot grow by more than this by sampling "
                           "up to --n (default 0.05)")
        else:
            p.add_argument("--out", type=_out_path, default=None, help="per-image predictions .tsv (summary .json beside it)")
            p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        _add_quiet(p)
        p.set_defaults(func=cmd_certify if name == "certify" else cmd_predict)

    p = command("plot", "certified accuracy against radius of one or more certify runs on one figure")
    p.add_argument("runs", nargs="+", metavar="RUN", help="certify logs (.tsv) or their summaries (.json)")
    p.add_argument("--label", action="append", default=None,
                   help="legend label of each run, in order (repeat; default: from each run's settings)")
    p.add_argument("--title", default=None, help="figure title (default: from the runs' settings)")
    p.add_argument("--out", type=_out_path, required=True, help="figure file (.png, .pdf or .svg)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_plot)

    # -- demo / merge / make-subset ----------------------------------------------------------------
    p = command("demo", "embedded default: train LeNet (Gaussian augmentation) on the shipped MNIST subset, "
                "certify 100 test images")
    p.add_argument("--out-dir", default="runs/demo", help="folder of the model, log, summary and plot")
    p.add_argument("--sigma", type=_positive_float, default=0.25, help="noise level of training and certification")
    p.add_argument("--epochs", type=_int_at_least(1), default=4, help="training epochs")
    p.add_argument("--images", type=_int_at_least(1), default=100, help="test images to certify")
    p.add_argument("--n0", type=_SAMPLES, default=100, help="selection samples per image")
    p.add_argument("--n", type=_SAMPLES, default=10_000, help="estimation samples per image")
    p.add_argument("--alpha", type=_unit_interval, default=0.001, help="failure probability of each certificate")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="training and noise seed")
    _add_device(p)
    _add_quiet(p)
    p.set_defaults(func=cmd_demo)

    p = command("merge", "merge the logs of certify --shard K --num-shards N runs into one table")
    p.add_argument("logs", nargs="+", help="shard .tsv logs (their .json summaries beside them)")
    p.add_argument("--out", type=_out_path, required=True, help="merged .tsv (.json and .png beside it)")
    p.add_argument("--allow-partial", action="store_true", help="merge unfinished or missing shards too")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_merge)

    p = command("data", "data tools: 'data pack SRC OUT' writes an image folder once as a packed store (preprocessed "
                "uint8 shards with sha256, read memory-mapped by --dataset packed)")
    p.add_argument("action", choices=("pack",), help="pack: image folder -> packed store")
    p.add_argument("src", help="folder of class folders (or, with --val-labels, the ImageNet validation images)")
    p.add_argument("out", help="folder of the packed store to write (new, or an unfinished pack of the same data)")
    p.add_argument("--image-size", type=_int_at_least(1), default=224,
                   help="centre crop size after resizing the shorter side to size/0.875 (224: resize 256, crop 224)")
    p.add_argument("--val-labels", default=None, help="ImageNet validation layout: '<file name> <label>' lines")
    p.add_argument("--val-classes", default=None, help="with --val-labels of class names: the training folder of class "
                   "folders (or a file of names in order) that numbers them")
    p.add_argument("--shard-images", type=_int_at_least(1), default=4096, help="images per shard file")
    _add_quiet(p)
    p.set_defaults(func=cmd_data)

    p = command("make-subset", "cut a small MNIST subset (gzipped idx files)")
    p.add_argument("--src", required=True, help="folder of the full MNIST idx files")
    p.add_argument("--dst", required=True, help="folder to write the subset to")
    p.add_argument("--train", type=_int_at_least(1), default=10_000, help="training images to keep")
    p.add_argument("--test", type=_int_at_least(1), default=2_000, help="test images to keep")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the random choice")
    p.add_argument("--overwrite", action="store_true", help="write into a --dst folder that is not empty")
    p.set_defaults(func=cmd_make_subset)

    # -- train -------------------------------------------------------------------------------------
    p = command("train", "certified-robust training (checkpoint every epoch, --resume)")
    _add_threads(p)
    p.add_argument("--method", choices=("standard", "gaussian", "smoothadv", "macer"), required=True,
                   help="training procedure")
    _add_dataset(p, required=True, training=True)
    p.add_argument("--arch", type=_arch_name, required=True, help=ARCH_HELP)
    p.add_argument("--weights", default=None, help="start from these weights (engine checkpoint, safetensors or "
                   "PyTorch state_dict of --arch) instead of a random initialisation")
    p.add_argument("--sigma", type=_nonnegative_float, required=True, help="noise level (> 0; >= 0 for standard)")
    p.add_argument("--epochs", type=_int_at_least(1), required=True, help="training epochs")
    _batch_size(p, 64)
    p.add_argument("--lr", type=_positive_float, default=0.01, help="learning rate")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="optimizer")
    p.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine", help="learning-rate schedule")
    p.add_argument("--momentum", type=_nonnegative_float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=1e-4, help="weight decay")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="weight initialisation, data order and noise")
    g = p.add_argument_group("smoothadv (Salman et al.)")
    g.add_argument("--attack-eps", dest="eps", type=float, default=None,
                   help="L2 radius of the attack (required for smoothadv)")
    g.add_argument("--eps", action=_Renamed, new="--attack-eps", meaning="SmoothAdv's L2 attack radius; --eps is the "
                   "poison's L_inf budget")
    g.add_argument("--steps", type=int, default=None, help="attack steps (default: 10)")
    g.add_argument("--m", type=int, default=None, help="noise draws per input (default: 1)")
    g.add_argument("--warmup", type=int, default=None, help="epochs over which eps grows linearly (default: 1)")
    g = p.add_argument_group("macer (Zhai et al.)")
    g.add_argument("--k", type=int, default=None, help="noise draws per input (default: 16)")
    g.add_argument("--beta", type=float, default=None, help="inverse temperature (default: 16)")
    g.add_argument("--gamma", type=float, default=None, help="hinge (default: 8)")
    g.add_argument("--lbd", type=float, default=None, help="weight of the robustness term (default: 12)")
    g.add_argument("--lbd-warmup", type=int, default=None,
                   help="epochs over which lbd grows linearly from 0 (default: 0, full lbd from the first epoch)")
    p.add_argument("--val-size", type=_int_at_least(0), default=0,
                   help="hold out this many training images for per-epoch validation")
    p.add_argument("--train-size", type=_int_at_least(1), default=None,
                   help="train on this many (random) images only (default: all)")
    p.add_argument("--stop-after-epoch", type=_int_at_least(1), default=None,
                   help="stop after this epoch; continue with --resume")
    _add_device(p)
    p.add_argument("--out", type=_out_path, required=True,
                   help="final model .safetensors (the epoch checkpoint is kept beside it)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint beside --out if there is one (else start)")
    p.add_argument("--checkpoint-minutes", type=_nonnegative_float, default=10.0,
                   help="also checkpoint inside an epoch every this many minutes (0: after every epoch only)")
    p.add_argument("--overwrite", action="store_true", help="start again even if a checkpoint exists")
    _add_quiet(p)
    p.set_defaults(func=cmd_train)

    # -- poison ------------------------------------------------------------------------------------
    p = command("poison", "craft a PACD poison (ApproxGrad) against a certified-robust training procedure")
    _add_threads(p)
    _add_dataset(p, training=True)
    p.add_argument("--val-size", type=_int_at_least(1), default=5000,
                   help="random images of the train split (a fixed permutation, seed 0) held out for the upper objective")
    p.add_argument("--target-class", type=_int_at_least(0), required=True, help="class whose certified radius to lower")
    p.add_argument("--method", choices=("gaussian", "macer", "smoothadv"), default="gaussian",
                   help="lower-level training procedure")
    p.add_argument("--method-args", default=None, help="JSON object of the lower-level procedure's arguments "
                   "(macer: k, beta, gamma, lbd; smoothadv: eps, steps, m), e.g. '{\"k\": 2}'")
    p.add_argument("--arch", type=_arch_name, default="lenet", help=f"lower-level model: {ARCH_HELP}")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="the settings of a published run for --method (paper-mnist: the reference implementation's "
                   "MNIST settings, docs/pacd.md); options given beside it override it and are recorded")
    p.add_argument("--sigma", type=_positive_float, default=None,
                   help="noise level of the lower-level procedure (required without --preset)")
    p.add_argument("--eps", type=_eps_budget, default=None,
                   help="L_inf budget of the poison, pixels in [0, 1] (required without --preset)")
    p.add_argument("--solver", choices=("approxgrad", "cg", "neumann"), default="approxgrad",
                   help="inverse-Hessian-vector solver")
    p.add_argument("--outer-steps", type=_int_at_least(0), default=None,
                   help="poison updates (required without --preset)")
    p.add_argument("--niter1", type=_int_at_least(0), default=10, help="lower-level steps per outer step")
    p.add_argument("--niter2", type=_int_at_least(1), default=10, help="solver iterations per outer step")
    p.add_argument("--lr-u", type=_positive_float, default=0.1, help="poison step size")
    p.add_argument("--lr-w", type=_positive_float, default=1e-3, help="lower-level learning rate")
    p.add_argument("--lr-p", type=_positive_float, default=1e-2, help="solver step size")
    p.add_argument("--damping", type=_nonnegative_float, default=1e-3, help="Hessian damping of the solver")
    p.add_argument("--reset-every", type=_int_at_least(0), default=10,
                   help="re-initialise the lower model every E epochs (0: never)")
    p.add_argument("--batch-clean", type=_int_at_least(1), default=900, help="clean images per lower-level batch")
    p.add_argument("--batch-poison", type=_int_at_least(1), default=100, help="poisoned images per lower-level batch")
    p.add_argument("--batch-val", type=_int_at_least(1), default=100, help="validation images per upper-level batch")
    p.add_argument("--lower-subset", type=_int_at_least(1), default=None,
                   help="craft against part of the clean data: the lower level trains on this many images of the "
                   "other classes (a random choice from --seed) beside the poison (default: all)")
    p.add_argument("--upper-k", type=_int_at_least(1), default=20, help="noise draws of the upper objective")
    p.add_argument("--k", action=_Renamed, new="--upper-k", meaning="noise draws of the upper objective; MACER's k "
                   "of the lower level goes in --method-args")
    p.add_argument("--upper-beta", type=_positive_float, default=16.0,
                   help="inverse temperature of the upper objective")
    p.add_argument("--beta", action=_Renamed, new="--upper-beta", meaning="the upper objective's inverse temperature")
    p.add_argument("--upper-alpha", type=_unit_interval, default=0.001,
                   help="the upper objective's probability squeeze a: Phi^-1((1 - 2a) p + a)")
    p.add_argument("--u-update", choices=("adam", "sign"), default="adam", help="poison update rule")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of batches, noise and initialisation")
    p.add_argument("--checkpoint-every", type=_int_at_least(1), default=50, help="outer steps between checkpoints")
    p.add_argument("--checkpoint-minutes", type=_nonnegative_float, default=10.0,
                   help="also checkpoint after a step ending this long after the last checkpoint (0: every step)")
    p.add_argument("--log-every", type=_int_at_least(0), default=0, help="print a JSON line every K steps (0: never)")
    _add_device(p)
    p.add_argument("--out", type=_out_path, required=True, help="poison .safetensors (its checkpoint is OUT.ckpt while it runs)")
    p.add_argument("--init", default=None, help="warm-start from this poison .safetensors (same data and target class): "
                   "its images, the schedule continuing after its outer steps; --outer-steps counts the new steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt if there is one (else start)")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep OUT.ckpt after the run finishes (it is removed by default)")
    p.add_argument("--encoding", choices=("int8", "float32"), default="int8",
                   help="how OUT stores the poison: int8 (the crafted poison quantised to eps/127 steps at the end, a "
                   "new poison recorded in settings['quantized'], 1 byte a pixel) or float32 (as crafted, 4 bytes); "
                   "OUT.ckpt stays float32")
    _add_quiet(p)
    p.set_defaults(func=cmd_poison)

    p = command("poison-snapshot", "save the poison as it stands in a poisoning checkpoint (safe while the run goes on)")
    p.add_argument("checkpoint", help="the poisoning run's checkpoint (poison OUT.ckpt)")
    p.add_argument("--checkpoint", action=_Renamed, new="a positional argument (poison-snapshot OUT.ckpt --out F)",
                   meaning="--checkpoint is a model file in certify")
    _add_poison_split(p, "the run")
    p.add_argument("--encoding", choices=("int8", "float32"), default="int8",
                   help="int8 (the snapshot quantised, a new poison) or float32 (as it stands)")
    p.set_defaults(func=cmd_poison_snapshot)

    p = command("poison-combine", "one poison from several of the same data, class and settings (vote: eps along the "
                "sign of their summed perturbations; mean: their average)")
    p.add_argument("poisons", nargs="+", help="poison .safetensors files (two or more for mean; one for vote moves "
                   "that poison out to the vertex along its own signs)")
    p.add_argument("--how", choices=COMBINE, default=COMBINE[0], help="how to combine")
    p.add_argument("--mixed-methods", action="store_true", help="also combine poisons crafted against different "
                   "procedures (the result's method names them all, e.g. macer+smoothadv)")
    _add_poison_split(p, "the poisons")
    p.add_argument("--encoding", choices=("auto", "sign", "int8", "float32"), default="auto",
                   help="auto: sign for a vote (lossless, 2 bits a pixel), int8 for a mean (quantised, a new poison)")
    p.set_defaults(func=cmd_poison_combine)

    p = command("poison-encode", "store a poison file as float32, int8 or sign (sign: vertex poisons only)")
    p.add_argument("poison", help="poison .safetensors to read")
    p.add_argument("--encoding", choices=("sign", "int8", "float32"), required=True,
                   help="sign: 2 bits a pixel, for a poison at a vertex of its eps box (e.g. a vote), bit for bit; "
                   "int8: 1 byte a pixel, exact for a vertex or int8 poison, else quantised (a new poison)")
    p.add_argument("--snap", action="store_true", help="with sign: move every pixel out to the vertex along its sign "
                   "(a new poison: what poison-combine --how vote of that one poison gives) instead of refusing")
    _add_poison_split(p, "the poison")
    p.set_defaults(func=cmd_poison_encode)

    p = command("poison-random", "a random control poison of the same images (vertex, sign, uniform, shift, or the "
                "twin of a crafted poison): the baseline a crafted poison must beat")
    p.add_argument("--kind", choices=CONTROLS, required=True,
                   help="vertex: +-eps at random, inward at [0, 1]; sign: +-eps at random, clipped; uniform: uniform in "
                   "[-eps, eps], clipped; shift: +eps everywhere, clipped; twin: the --like poison's per-pixel "
                   "magnitudes with random signs (inward at [0, 1])")
    p.add_argument("--like", default=None, help="the crafted poison .safetensors a twin copies magnitudes from")
    p.add_argument("--target-class", type=_int_at_least(0), default=None,
                   help="class whose training images are perturbed (default with --like: the poison's)")
    p.add_argument("--eps", type=_eps_budget, default=None, help="L_inf budget (default with --like: the poison's)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the random signs or values")
    _add_poison_split(p, "the poisons compared with")
    p.add_argument("--encoding", choices=("auto", "sign", "int8", "float32"), default="auto",
                   help="auto: sign for vertex, sign and shift (lossless), int8 for uniform and twin (quantised)")
    p.set_defaults(func=cmd_poison_random)

    # -- evaluate ----------------------------------------------------------------------------------
    p = command("evaluate", "train a victim on clean or poisoned data and certify the target class")
    _add_threads(p)
    p.add_argument("--poison", default=None, help="poison .safetensors (or --clean)")
    p.add_argument("--clean", action="store_true", help="clean victim (needs --target-class)")
    p.add_argument("--target-class", type=_int_at_least(0), default=None,
                   help="class to certify (default: the poison's; required with --clean)")
    _add_dataset(p, training=True, test=True)
    p.add_argument("--val-size", type=_int_at_least(1), default=5000, help="the poison's --val-size")
    p.add_argument("--victim-method", choices=("standard", "gaussian", "macer", "smoothadv"), default="gaussian",
                   help="the victim's training procedure")
    p.add_argument("--method-args", default=None, help="JSON object of the victim procedure's arguments "
                   "(smoothadv: eps, steps, m, warmup; macer: k, beta, gamma, lbd, lbd_warmup)")
    p.add_argument("--arch", type=_arch_name, default="lenet", help=f"victim architecture: {ARCH_HELP}")
    p.add_argument("--weights", default=None, help="start the victim from these weights (engine checkpoint, "
                   "safetensors or PyTorch state_dict of --arch) instead of a random initialisation")
    p.add_argument("--sigma", type=_positive_float, required=True, help="noise level of training and certification")
    p.add_argument("--epochs", type=_int_at_least(1), default=20, help="victim training epochs")
    _batch_size(p, 64, renamed=False)
    p.add_argument("--lr", type=_positive_float, default=0.01, help="victim learning rate")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="victim optimizer")
    p.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine",
                   help="victim learning-rate schedule")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="victim initialisation, data order and noise")
    p.add_argument("--images", type=_int_at_least(1), default=500, help="test images of the target class to certify")
    _add_certify_args(p)
    _add_device(p)
    p.add_argument("--out-dir", required=True, help="folder of the victim, its certification log and summary.json")
    p.add_argument("--compare", action="append", default=[], metavar="DIR",
                   help="out-dir of an earlier evaluation (e.g. the clean victim) to show side by side; repeatable")
    p.add_argument("--controls", type=_controls, default="twin,vertex", metavar="KINDS",
                   help="random controls evaluated beside a --poison with the same victim settings (in "
                   "OUT_DIR/controls/): a comma-separated list of " + ", ".join(CONTROLS) + ", or none")
    p.add_argument("--control-seed", type=_int_at_least(0), default=0, help="seed of the controls' random signs")
    _add_quiet(p)
    p.set_defaults(func=cmd_evaluate)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line: one ``warning: ...`` line, without the source line."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def _os_error(exc: OSError) -> str:
    import errno

    name = exc.filename if exc.filename is not None else ""
    what = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return (f"disk full writing {name or 'an output'} ({what}); what was written before is kept: free space and "
                "run the same command again to continue")
    return f"{name}: {what}" if name else what


def main(argv=None) -> int:
    """Entry point of ``python -m engine`` and of the ``pacd-engine`` console script.

    User errors end in one ``error: ...`` line and exit status 2; bugs of the engine still show a traceback."""
    import warnings

    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    parser = build_parser("pacd-engine" if script.startswith("pacd-engine") else "python -m engine")
    args = parser.parse_args(argv)
    args.given_options = {tok.split("=", 1)[0] for tok in (sys.argv[1:] if argv is None else argv)
                          if isinstance(tok, str) and tok.startswith("--")}
    if getattr(args, "shard", 0) >= getattr(args, "num_shards", 1):
        parser.error(f"--shard must be < --num-shards ({args.num_shards})")
    if args.command in ("certify", "predict") and args.arch is not None and args.weights is None:
        parser.error("--arch goes with --weights FILE (a --checkpoint records its architecture)")
    from .data import DataError
    from .fileio import FileInUseError
    from .models import CheckpointError
    from .pacd import PoisonError
    from .validate import InputError

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    from . import _ext

    try:
        _ext.cpu_isa()  # a misspelt ENGINE_CPU_ISA: one error now, not a traceback from the first fused forward
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    import signal

    def terminated(signum, frame):  # SIGTERM unwinds like Ctrl-C: locks released, a run without rows removed
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, terminated)
    except ValueError:  # not the main thread
        previous = None
    try:
        if args.command not in ("certify", "poison") and _launch_world_size() > 1:
            raise UsageError(f"{args.command} runs in one process: under torchrun (WORLD_SIZE > 1) only certify and poison "
                             "split their work over the processes")
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: what was written is kept; run the same command again to continue", file=sys.stderr)
        return 130
    except (UsageError, InputError, DataError, CheckpointError, ResultsError, PoisonError, FileInUseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable or full output folder, a missing input file
        print(f"error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":  # safetensors' writer: a full or read-only folder
            raise
        print(f"error: cannot write a safetensors file: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _leave_process_group()
