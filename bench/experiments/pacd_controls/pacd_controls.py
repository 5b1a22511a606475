"""PACD against its random controls on MNIST (target class 8): a protocol fixed before it runs, every run reported.

Stages (each resumable; run them again after a crash, or in several processes with different --only):

    protocol   write results/protocol.json: every setting, row and seed, and the CPU-hour estimate. Written once;
               every later stage refuses to run if the driver's protocol differs from the file's.
    estimate   time one outer step per procedure and one victim epoch and certification per procedure on this CPU,
               and record the CPU-hour estimate (in results/estimate.json, referenced by the protocol).
    craft      the crafted poisons (poison --preset paper-mnist, outer steps of the protocol), resumable checkpoints.
    controls   the random controls of every crafted poison (engine.pacd.random_poison; twin, vertex, sign, uniform,
               shift).
    victims    train and certify every (row, victim seed) of the protocol (engine.evaluate.evaluate_poison), resumable;
               makes the twins whose crafted poison exists first; needs --threads (part of the machine kind). A
               finished victim whose results are not its row's now (settings, certification, poison file) is set
               aside (renamed, never deleted) and trained again; the summary refuses such a victim.
    summary    results/summary.json (schema below), results/results.md and results/drop_vs_accuracy.png from every
               finished victim; rows with missing victims are reported as missing, never dropped.
    status     where the work stands: crafting steps, victims finished per machine kind, CPU hours left.
    inspect    a diagnostic, not a result: where each poison (and each crafting checkpoint as it stands) spends its
               budget on the class's pixels (background, strokes, at the box's edge); results/poison_stats.json.

Every stage but protocol and estimate first syncs --work with results/kept (tracked): the finished crafted poisons
and victims' results (certify.tsv, certify.json, summary.json) missing from --work are taken from it, and those it
lacks are copied into it (a finished victim or poison is also copied as soon as it is written). Commit results/kept:
a new checkout has no --work folder. The controls are not kept: --stage controls (or victims) makes them again from
their seed.

    python bench/experiments/pacd_controls/pacd_controls.py --stage protocol --data-root ../shared/data/mnist
    python bench/experiments/pacd_controls/pacd_controls.py --stage all --data-root ../shared/data/mnist --threads 1

summary.json: {"protocol": {...}, "rows": [{"table", "arch", "victim", "poison", "source", "kind", "control", "eps",
"machine", "outer_steps", "seeds", "paired_seeds", "missing_seeds", "complete", "acr_clean", "acr_poisoned", "acr_drop",
"acr_drop_ci95", "acr_drop_per_seed", "drop_minus_twin", "drop_minus_twin_ci95", "smoothed_acc",
"radius_given_correct", "clean_acc_target", "clean_acc_other", "cost_target", "images", "n", "cpu", "threads",
"same_machine_kind"}], "goal": {machine: {"<proc>-eps0.1": {...}, "gaussian-eps0.03": {...}, ...}}}: one set of rows
per machine kind with finished victims. "kind" is clean, crafted or control ("control" names which: twin, vertex,
sign, uniform, shift).
Intervals resample victim seeds (paired: the clean, poisoned and twin victims of one seed together), then test images
within each (paired across victims), 10,000 times.

--dry-run runs the whole pipeline at toy sizes (1,000 embedded MNIST images, 2 outer steps, 3 epochs, 4 images, n 100) into
--work and --results given; the test suite runs it that way.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import re
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from engine import data, models
from engine.evaluate import evaluate_poison, target_test_indices
from engine.fileio import ExclusiveLock, FileInUseError, fsync_dir, publish
from engine.pacd import (
    PoisonError,
    PoisonSet,
    compact_checkpoint,
    expand_checkpoint,
    init_record,
    poison,
    preset,
    random_poison,
    read_checkpoint,
    read_compact_checkpoint,
    read_poison_header,
)
from engine.results import cpu_kind, read_log, run_trace

TARGET = 8
PROCEDURES = ("gaussian", "macer", "smoothadv")
CONTROL_KINDS = ("twin", "vertex", "sign", "uniform", "shift")
MAIN_KINDS = ("crafted", "twin", "vertex")  # 3 victim seeds; the other controls 1
LOW_EPS = (0.03, 0.05)  # Gaussian augmentation only: crafted, twin, vertex, shift
# victims: LeNet from scratch with the settings of the committed MNIST study (bench/experiments/pacd_mnist:
# victim_args, issue-3 settings), SGD lr 0.01 cosine, batch 64; sigma = the procedure's crafting sigma
VICTIM_EPOCHS = {"gaussian": 10, "macer": 3, "smoothadv": 3}
VICTIM_ARGS = {
    "gaussian": {},
    "macer": {"k": 16, "lbd": 1.0, "lbd_warmup": 2, "gamma": 8.0, "beta": 16.0},
    "smoothadv": {"eps": 1.0, "steps": 10, "m": 1, "warmup": 2},
}
OUTER_STEPS = {"gaussian": 2750, "macer": 1100, "smoothadv": 2200}  # >= 2 re-initialisations each
TRANSFER_ARCHS = ("lenet", "mlp")
AMENDMENTS = [
    {"date": "2026-12-06", "before": "any victim was trained or certified (crafting under way; its settings unchanged)",
     "what": "rows of the transfer table the issue asks for (table 'transfer': every crafted poison at eps 0.1 x every "
             "victim procedure x LeNet and the MLP, the clean victims and the vertex control beside them, victim seed "
             "0, the same certification); every row names its arch, table and source procedure; victims are stored "
             "and paired per CPU kind and thread count; the controls other than the twin are made without waiting "
             "for the crafted poison (the same images: every training image of the class)",
     "why": "the transfer table was left out of the first protocol; training is not bit-reproducible across CPUs, "
            "so a row pairs only victims of one machine kind"},
]
HERE = Path(__file__).resolve().parent


def build_protocol(args) -> dict:
    dry = args.dry_run
    seeds_main = [0] if dry else [0, 1, 2]
    rows = []

    def row(victim, source, kind, eps, seeds, arch="lenet", table="main"):
        name = "clean" if kind == "clean" else f"{source}-eps{eps:g}-{kind}"
        rows.append({"table": table, "arch": arch, "victim": victim, "poison": name, "source": source, "kind": kind,
                     "eps": eps, "seeds": seeds})

    for proc in PROCEDURES:
        row(proc, None, "clean", None, seeds_main)
        for kind in ("crafted", *CONTROL_KINDS):
            row(proc, proc, kind, 0.1, seeds_main if kind in MAIN_KINDS else [0])
    if not dry:
        for eps in LOW_EPS:
            for kind in ("crafted", "twin", "vertex", "shift"):
                row("gaussian", "gaussian", kind, eps, seeds_main if kind in MAIN_KINDS else [0])
    # the transfer table (amendment 1): every crafted poison at eps 0.1 against every victim procedure, LeNet and the
    # MLP, beside the clean victims and the vertex control (the same images for every procedure: seed 0, eps 0.1);
    # victim seed 0; the LeNet cells of a poison's own procedure are the main rows
    for arch in TRANSFER_ARCHS:
        for victim in PROCEDURES:
            if arch != "lenet":
                row(victim, None, "clean", None, [0], arch, "transfer")
                row(victim, "gaussian", "vertex", 0.1, [0], arch, "transfer")
            for source in PROCEDURES:
                if arch != "lenet" or source != victim:
                    row(victim, source, "crafted", 0.1, [0], arch, "transfer")
    crafting = {}
    for proc in PROCEDURES:
        settings = preset("paper-mnist", proc)
        settings["outer_steps"] = 2 if dry else OUTER_STEPS[proc]
        if dry:
            settings.update(batch_clean=16, batch_poison=4, batch_val=4, k=2, niter1=1, niter2=1)
        crafting[proc] = settings
    return {
        "name": "pacd_controls",
        "target_class": TARGET,
        "data": {"dataset": "mnist", "data_root": "embedded" if dry else str(args.data_root), "val_size": 100 if dry
                 else 5000, "split_seed": 0, "train_images": 1000 if dry else "all"},
        "crafting": {"preset": "paper-mnist", "seed": 0, "settings": crafting,
                     "eps": {proc: [0.1, *([] if proc != "gaussian" or dry else LOW_EPS)] for proc in PROCEDURES}},
        "controls": {"seed": 0, "kinds": list(CONTROL_KINDS)},
        "victims": {"arch": {"main": "lenet", "transfer": list(TRANSFER_ARCHS)},
                    "epochs": {p: 3 for p in PROCEDURES} if dry else VICTIM_EPOCHS,
                    "method_args": VICTIM_ARGS, "sigma": {p: crafting[p]["sigma"] for p in PROCEDURES},
                    "optimizer": "sgd", "lr": 0.05 if dry else 0.01, "schedule": "cosine", "batch_size": 64},
        "certification": {"images": 4 if dry else 200, "image_seed": 0, "n0": 10 if dry else 100,
                          "n": 100 if dry else 100_000, "alpha": 0.001},
        "intervals": {"level": 0.95, "reps": 10_000, "resample": "victim seeds, then test images (paired)"},
        "rows": rows,
        "rules": ["every run made under this protocol is reported in summary.json (no selection among screens)",
                  "victims compared in a row are trained on the same CPU kind with the same thread count; the summary "
                  "flags a row whose victims differ",
                  "the crafted poisons are the preset's, not post-processed (no vote, no snap)"],
        "amendments": AMENDMENTS,
    }


def _stable(protocol: dict) -> str:
    return json.dumps(protocol, sort_keys=True)


def check_protocol(args, protocol: dict) -> None:
    path = args.results / "protocol.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run --stage protocol first (the protocol is fixed before any run)")
    stored = json.loads(path.read_text())
    recorded = {k: v for k, v in stored.items() if k not in ("written", "machine", "git_commit", "estimate",
                                                              "amended")}
    if _stable(recorded) != _stable(protocol):
        raise SystemExit(f"{path} differs from this driver's protocol: the protocol is fixed; start a new results "
                         "folder for another one")


def write_protocol(args, protocol: dict) -> None:
    path = args.results / "protocol.json"
    if path.exists() and args.amend:
        amend_protocol(args, protocol)
        return
    if path.exists():
        check_protocol(args, protocol)
        print(f"{path} exists and matches")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**protocol, "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": run_trace(),
              "estimate": "estimate.json (stage estimate)"}
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


def amend_protocol(args, protocol: dict) -> None:
    """Replace the stored protocol by the driver's, only before any victim exists and with the crafting unchanged
    (the amendment is listed in the protocol's ``amendments``; ``written`` stays, ``amended`` is added)."""
    path = args.results / "protocol.json"
    stored = json.loads(path.read_text())
    victims = args.work / "victims"
    if victims.exists() and any(p.is_file() for p in victims.rglob("*")):
        raise SystemExit(f"{victims} holds victims (finished or under way): the protocol can no longer be amended")
    for key in ("crafting", "controls", "data", "target_class", "certification"):
        if _stable(stored.get(key)) != _stable(protocol[key]):
            raise SystemExit(f"the amendment changes the protocol's {key!r}: start a new results folder instead")
    before, after = stored.get("amendments") or [], protocol["amendments"]
    if len(after) <= len(before) or _stable(after[:len(before)]) != _stable(before):
        raise SystemExit("an amendment must be listed: append it to AMENDMENTS (date, before, what, why), keeping the "
                         "earlier ones")
    record = {**protocol, "written": stored["written"], "amended": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "machine": stored.get("machine"), "estimate": stored.get("estimate")}
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"amended {path}")


def load_data(args, protocol):
    root = data.embedded_mnist_root() if args.dry_run else args.data_root
    images, labels = data.load_mnist(root, "train")
    train, val = data.split_validation(images, labels, protocol["data"]["val_size"])
    if protocol["data"]["train_images"] != "all":  # a dry run: crafting and victims on the first images of the split
        keep = protocol["data"]["train_images"]
        train = (train[0][:keep], train[1][:keep])
    return train, val, data.load_mnist(root, "test")


def poison_path(args, proc: str, eps: float, kind: str) -> Path:
    """The file of the poison crafted for ``proc`` at ``eps`` (``kind`` crafted) or of one of its controls."""
    return args.work / "poisons" / f"{proc}-eps{eps:g}-{kind}.safetensors"


def checkpoint_path(out: Path) -> Path:
    """The crafting checkpoint of the poison file ``out``."""
    return out.with_name(out.name + ".ckpt")


def crafting_runs_path(out: Path) -> Path:
    """The JSON-lines record of the runs that crafted ``out`` (one line per start or resume)."""
    return out.with_name(out.name + ".runs.jsonl")


def _record_run(out: Path, from_step: int, world: int | None, note: str | None = None, expanded: bool = False) -> None:
    """Append one crafting run's start to ``out``'s record: the step it resumed from, its processes, threads and
    machine kind (a poison's crafting is not bit-reproducible across CPUs or process counts). A run's steps end
    where the next record's ``from_step`` begins. ``expanded``: no run but the checkpoint expanded from its compact
    copy at ``from_step`` (no processes or threads; marked ``"expanded": true``)."""
    runs = crafting_runs_path(out)
    lines = []
    if not runs.exists() and from_step > 0:  # the runs before this record existed: nothing known of them
        lines.append({"from_step": 0, "world_size": None, "threads_per_process": None, "machine": None,
                      "note": "runs before this record existed (not recorded)"})
    lines.append({"from_step": from_step, "world_size": world,
                  "threads_per_process": None if expanded else torch.get_num_threads(),
                  "machine": machine_tag(), "cpu": run_trace()["cpu"], **({"expanded": True} if expanded else {}),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime()), **({"note": note} if note else {})})
    with open(runs, "a") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")


def crafting_runs(out: Path) -> list[dict]:
    runs = crafting_runs_path(out)
    if not runs.exists():
        return []
    return [json.loads(line) for line in runs.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# kept results: what a new machine cannot make again cheaply, in the tracked results folder
# ----------------------------------------------------------------------------------------------

# summary.json last: a victim with one counts as finished
KEPT_VICTIM_FILES = ("certify.tsv", "certify.json", "summary.json")


def kept_dir(args) -> Path:
    """The tracked copy of the finished crafted poisons (int8 files LZMA-compressed, with their runs record), of the
    crafting checkpoints of unfinished ones (compact, engine.pacd.compact) and of the finished victims' results
    (certify.tsv, certify.json, summary.json), under --results: a new checkout has no --work folder (untracked), and
    these are hours of CPU time. The controls are made again from their seed in seconds."""
    return args.results / "kept"


def _write(dest: Path, payload: bytes) -> None:
    """``payload`` as the file ``dest``, atomically (a temporary file of this process beside it, published)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    publish(tmp, dest)


def _copy(src: Path, dest: Path) -> None:
    _write(dest, src.read_bytes())


def kept_poison_path(args, work: Path) -> Path:
    """The kept copy of the finished crafted poison file ``work``: the file LZMA-compressed (an int8 poison, most of
    its codes at the box's edges, takes about a quarter of its 4.3 MB), its runs record beside it."""
    return kept_dir(args) / "poisons" / (work.name + ".xz")


def _kept_runs_path(args, work: Path) -> Path:
    return crafting_runs_path(kept_dir(args) / "poisons" / work.name)


def _keep_poison_copy(args, work: Path) -> None:
    """Copy the finished crafted poison ``work`` and its runs record to the kept results (the record first: a poison
    file there counts as finished)."""
    if crafting_runs_path(work).exists():
        _copy(crafting_runs_path(work), _kept_runs_path(args, work))
    _write(kept_poison_path(args, work), lzma.compress(work.read_bytes(), preset=6))


def _kept_poison_bytes(args, work: Path) -> bytes:
    """The poison file that the kept copy of ``work`` holds (SystemExit naming a damaged one)."""
    keep = kept_poison_path(args, work)
    try:
        return lzma.decompress(keep.read_bytes())
    except lzma.LZMAError as exc:
        raise SystemExit(f"{keep}: damaged kept poison ({exc}); take it from git again (git checkout -- {keep})")


def _restore_poison_copy(args, work: Path) -> None:
    """The kept poison and its runs record back into the work folder as ``work`` (the record first)."""
    payload = _kept_poison_bytes(args, work)
    if _kept_runs_path(args, work).exists():
        _copy(_kept_runs_path(args, work), crafting_runs_path(work))
    _write(work, payload)


def _keep_victim(args, out: Path) -> bool:
    """Copy the finished victim in ``out`` (a folder under --work/victims; the caller holds its lock) to the kept
    results unless they hold these results already; True where copied. The kept summary.json is removed first and
    written last, so a copy cut short leaves no kept victim (the next sync copies it again), never a mix of two runs."""
    dest = kept_dir(args) / out.relative_to(args.work)
    if (dest / "summary.json").exists() and (dest / "summary.json").read_bytes() == (out / "summary.json").read_bytes():
        return False
    (dest / "summary.json").unlink(missing_ok=True)
    for name in KEPT_VICTIM_FILES:
        _copy(out / name, dest / name)
    return True


def _restore_victim(kept: Path, out: Path) -> bool:
    """Copy the kept victim in ``kept`` to ``out`` in the work folder unless a folder is there (the caller holds its
    lock); True where copied. The files go into a folder beside it that is renamed into place, so a restore cut short
    leaves nothing that looks like a victim under way."""
    if out.exists():
        return False
    tmp = out.with_name(f"{out.name}.restore-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in KEPT_VICTIM_FILES:
        shutil.copyfile(kept / name, tmp / name)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    return True


def _with_victim_lock(out: Path, action) -> bool:
    """``action()`` while holding the victim's lock (the one stage_victims holds from its look at the summary to the
    summary written); False without calling it where another process has the victim."""
    try:
        lock = ExclusiveLock(out).acquire()
    except FileInUseError:
        return False
    try:
        return action()
    finally:
        lock.release()


def _keep_poison(args, work: Path) -> bool:
    """Copy the finished crafted poison ``work`` (and its runs record) to the kept results unless it is there; True
    where copied. A kept poison that differs from it is refused by name (neither is replaced). Once it is kept, the
    kept compact copy of its crafting checkpoint is removed."""
    keep = kept_poison_path(args, work)
    if keep.exists():
        if _kept_poison_bytes(args, work) != work.read_bytes():
            raise SystemExit(f"{work} differs from the kept poison {keep}: move one of them away (the victims of the "
                             "other become stale)")
        kept_checkpoint_path(args, work).unlink(missing_ok=True)
        return False
    _keep_poison_copy(args, work)
    kept_checkpoint_path(args, work).unlink(missing_ok=True)
    return True


# a crafting checkpoint (61 MB for LeNet) is kept compactly (engine.pacd.compact: about a third of it, lossy) so that
# a poison whose crafting spans sessions survives a new checkout
EXPANDED_NOTE = ("the work folder's checkpoint was expanded from the kept compact checkpoint (lossy, once: the poison "
                 "rounded to its int8 codes, the Adam moments to bfloat16); the next run resumes from it")


def kept_checkpoint_path(args, work: Path) -> Path:
    """The kept compact copy of the crafting checkpoint of the poison file ``work``."""
    return kept_dir(args) / "poisons" / (checkpoint_path(work).name + ".xz")


def _keep_checkpoint(args, work: Path, train) -> str | None:
    """Compact the crafting checkpoint of the unfinished poison ``work`` into the kept results (with the poison's runs
    record) unless the kept copy is at its step or later; what was kept, or None. ``train()``: the training split.
    One process at a time (a lock on the kept copy; another process that holds it is left to it); a kept copy that
    cannot be read is replaced; a poison that finished meanwhile takes its place."""
    ckpt, dest = checkpoint_path(work), kept_checkpoint_path(args, work)
    if work.exists() or not ckpt.exists():
        return None
    try:
        lock = ExclusiveLock(dest).acquire()
    except FileInUseError:
        return None
    try:
        if work.exists() or not ckpt.exists():
            return None
        step = int(read_checkpoint(ckpt)[1]["step"])
        if dest.exists():
            try:
                kept_step = int(read_compact_checkpoint(dest)[1]["checkpoint"]["step"])
            except (PoisonError, KeyError, TypeError, ValueError) as exc:
                print(f"== {dest.name}: unreadable ({exc}); replaced by the work folder's checkpoint", flush=True)
                kept_step = -1
            if kept_step > step:
                print(f"== {ckpt.name}: at step {step}, behind its kept compact copy (step {kept_step}); the kept "
                      "copy stays. Set the work folder's checkpoint aside to resume from the kept one", flush=True)
            if kept_step >= step:
                return None
        info = compact_checkpoint(ckpt, train(), dest)
        if crafting_runs_path(work).exists():
            _copy(crafting_runs_path(work), _kept_runs_path(args, work))
        if work.exists():  # finished meanwhile: the poison is kept instead (the next sync)
            dest.unlink(missing_ok=True)
            return None
        return f"{dest.name} (step {info['step']}, {info['bytes'] / 1e6:.1f} MB)"
    finally:
        lock.release()


def _restore_checkpoint(args, work: Path, train) -> str | None:
    """Expand the kept compact checkpoint of the unfinished poison ``work`` into the work folder where it has no
    checkpoint (under the checkpoint's lock, as a crafting run holds it; skipped where another process holds it),
    with the poison's kept runs record and a line saying so; what was restored, or None."""
    ckpt, src = checkpoint_path(work), kept_checkpoint_path(args, work)
    if work.exists() or ckpt.exists() or not src.exists():
        return None
    try:
        lock = ExclusiveLock(ckpt).acquire()
    except FileInUseError:
        return None
    try:
        if ckpt.exists():
            return None
        got = expand_checkpoint(src, train(), ckpt)
        runs, kept_runs = crafting_runs_path(work), _kept_runs_path(args, work)
        if runs.exists():  # the record of another line of runs (its checkpoint gone): set aside, never mixed in
            set_aside(runs)
        if kept_runs.exists():
            _copy(kept_runs, runs)
        _record_run(work, got["step"], None, note=EXPANDED_NOTE, expanded=True)
        return f"{ckpt.name} (step {got['step']}, from its compact copy)"
    finally:
        lock.release()


def sync_kept(args, protocol) -> None:
    """Both ways between --work and the kept results. Into --work: every kept crafted poison missing there (its runs
    record first), the kept compact crafting checkpoint of an unfinished poison that has no checkpoint there
    (expanded), and every kept victim whose folder does not exist there (a folder there is a victim of this
    machine, finished or under way: never overwritten). Into the kept results: every finished crafted poison, the
    compact copy of every crafting checkpoint ahead of its kept copy, and every finished victim of the protocol whose
    results they do not hold (a victim trained again replaces its old copy). A victim another process has (its lock)
    is left alone. Commit the kept folder to keep them."""
    kept = kept_dir(args)
    restored, copied = [], []
    loaded = []

    def train():  # the training split, loaded once and only where a checkpoint is compacted or expanded
        if not loaded:
            loaded.append(load_data(args, protocol)[0])
        return loaded[0]

    for proc in PROCEDURES:
        for eps in protocol["crafting"]["eps"][proc]:
            work = poison_path(args, proc, eps, "crafted")
            if kept_poison_path(args, work).exists() and not work.exists():
                _restore_poison_copy(args, work)
                kept_checkpoint_path(args, work).unlink(missing_ok=True)  # the finished poison supersedes it
                restored.append(work.name)
            elif work.exists() and _keep_poison(args, work):
                copied.append(work.name)
            if (name := _restore_checkpoint(args, work, train)) is not None:
                restored.append(name)
            elif (name := _keep_checkpoint(args, work, train)) is not None:
                copied.append(name)
    for done in sorted((kept / "victims").rglob("summary.json")) if (kept / "victims").exists() else []:
        out = args.work / done.parent.relative_to(kept)
        if not out.exists() and _with_victim_lock(out, lambda out=out, done=done: _restore_victim(done.parent, out)):
            restored.append(str(out.relative_to(args.work)))
    root = args.work / "victims"
    for machine in sorted(d for d in root.iterdir() if d.is_dir()) if root.exists() else []:
        for row in protocol["rows"]:
            for seed in row["seeds"]:
                out = victim_dir(args, row, seed, machine.name)

                def keep(out=out):  # under the lock: the folder may have been set aside meanwhile
                    return all((out / n).exists() for n in KEPT_VICTIM_FILES) and _keep_victim(args, out)

                if (out / "summary.json").exists() and _with_victim_lock(out, keep):
                    copied.append(str(out.relative_to(args.work)))
    for what, names in (("restored from", restored), ("kept in", copied)):
        if names:
            print(f"== {what} {kept}: {len(names)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")


def stage_craft(args, protocol, train, val, only=None, eps_only=None) -> None:
    """Craft every poison of the protocol not yet made (of the procedures ``only`` and the eps ``eps_only``, in the
    protocol's order). Under torchrun (WORLD_SIZE > 1) the ranks craft each poison together, data-parallel
    (engine.poison's distributed mode: the same algorithm and batches, sums in another order); each run's start,
    processes and machine are recorded beside the poison and in its settings."""
    from engine.distributed import init_from_env, world

    init_from_env(torch.device("cpu"))
    rank, world_size = world()
    say = print if rank == 0 else (lambda *a, **k: None)
    for proc in PROCEDURES:
        if only and proc not in only:
            continue
        for eps in protocol["crafting"]["eps"][proc]:
            if eps_only and eps not in eps_only:
                continue
            out = poison_path(args, proc, eps, "crafted")
            ckpt = checkpoint_path(out)
            done = [out.exists()]
            if world_size > 1:  # every rank takes rank 0's look at the files
                import torch.distributed as dist

                dist.broadcast_object_list(done, src=0)
            if done[0]:
                say(f"== {out.name}: done")
                continue
            settings = {**protocol["crafting"]["settings"][proc], "eps": eps}
            out.parent.mkdir(parents=True, exist_ok=True)
            say(f"== crafting {out.name} ({settings['outer_steps']} outer steps, {world_size} process"
                f"{'es' if world_size > 1 else ''})", flush=True)
            started = []

            def log(entry, out=out, started=started):
                if not started and rank == 0:
                    _record_run(out, entry["step"] - 1, world_size)
                started.append(True)

            try:
                ps = poison(lambda: models.build("lenet"), train, val, target_class=TARGET, method=proc,
                            seed=protocol["crafting"]["seed"], checkpoint=ckpt, checkpoint_every=10, device="cpu",
                            progress=not args.quiet, encoding="int8", log=log, **settings)
            except FileInUseError as exc:  # another process crafts it (every rank hears so): go on with the next
                say(f"== {out.name}: skipped, {exc}", flush=True)
                continue
            if not started and rank == 0:  # a checkpoint already at its last step: the poison written from it
                _record_run(out, settings["outer_steps"], world_size, note="resumed a finished checkpoint: no step run")
            ps.settings.update({"preset": "paper-mnist", "dataset": "mnist",
                                "val_size": protocol["data"]["val_size"], "crafting_runs": crafting_runs(out)})
            if rank == 0:
                ps.save(out)
                _keep_poison(args, out)
            if world_size > 1:
                dist.barrier()  # the next poison's look sees this one written


def stage_controls(args, protocol, train) -> None:
    """Every control file a row names. The twin waits for its crafted poison; the other kinds perturb every training
    image of the class (the crafted poison's images) and are made at once, so their victims need not wait."""
    wanted = sorted({(r["source"], r["eps"], r["kind"]) for r in protocol["rows"] if r["kind"] in CONTROL_KINDS},
                    key=lambda t: (PROCEDURES.index(t[0]), t[1], CONTROL_KINDS.index(t[2])))
    for proc, eps, kind in wanted:
        out = poison_path(args, proc, eps, kind)
        if out.exists() and kind == "twin" and (why := twin_problem(args, proc, eps)) is not None:
            if not poison_path(args, proc, eps, "crafted").exists():
                print(f"== {out.name}: {why}; kept until the crafted poison is there")
                continue
            moved = set_aside(out)
            print(f"== {out.name}: {why}; " + (f"set aside as {moved.name}" if moved else "set aside by another process")
                  + "; made again")
        if out.exists():
            continue
        like = None
        if kind == "twin":
            crafted = poison_path(args, proc, eps, "crafted")
            if not crafted.exists():
                print(f"== {out.name}: waiting for {crafted.name}")
                continue
            like = PoisonSet.load(crafted, train)
        ps = random_poison(train, target_class=TARGET, eps=eps, kind=kind, seed=protocol["controls"]["seed"], like=like)
        out.parent.mkdir(parents=True, exist_ok=True)
        ps.encode(train, "sign" if kind in ("vertex", "sign", "shift") else "int8").save(out)
        print(f"== wrote {out.name}")


def set_aside(path: Path) -> Path | None:
    """Rename ``path`` (a file or a victim's folder) out of the way, never over anything: nothing is deleted. None
    where another process moved it first."""
    stamp = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"  # two processes never pick one name
    for i in range(1000):
        dest = path.with_name(f"{path.name}.stale-{stamp}" + (f"-{i}" if i else ""))
        if not dest.exists():
            try:
                path.rename(dest)
            except FileNotFoundError:  # another process set it aside first
                return None
            return dest
    raise SystemExit(f"cannot set {path} aside: too many stale copies beside it")


def twin_problem(args, proc: str, eps: float) -> str | None:
    """Why the twin file of ``proc`` at ``eps`` is not the twin of the crafted poison there now (None: it is)."""
    twin, crafted = poison_path(args, proc, eps, "twin"), poison_path(args, proc, eps, "crafted")
    if not crafted.exists():
        return f"its crafted poison {crafted.name} is missing"
    like = read_poison_header(twin)["meta"]["settings"].get("like") or {}
    identity = read_poison_header(crafted)["sha256"]
    if like.get("sha256") != identity:
        return f"it is the twin of poison {str(like.get('sha256'))[:12]}, not of {crafted.name} ({identity[:12]})"
    return None


def victim_problem(summary: dict, protocol: dict, row: dict, seed: int, identity: str | None) -> str | None:
    """Why a finished victim's results are not those of ``row`` and ``seed`` under the protocol (None: they are):
    its training settings, its certification, or its poison (``identity``: the sha256 of the row's poison file now,
    None for a clean row) differ."""
    c, want = protocol["certification"], victim_training(protocol, row, seed)
    got = summary.get("train_settings") or {}
    diff = [f"{k} {got.get(k)!r} (protocol {w!r})" for k, w in want.items() if got.get(k) != w]
    diff += [f"{k} {summary.get(k)!r} (protocol {c[k]!r})" for k in ("images", "n0", "n", "alpha")
             if summary.get(k) != c[k]]
    had = (summary.get("trace") or {}).get("poison_content_sha256")
    if identity is None and (got.get("poison_sha256") is not None or had is not None):
        diff.append("a poisoned training set (the row is clean)")
    elif identity is not None and had != identity:
        diff.append(f"poison {str(had)[:12]} (the row's file now: {identity[:12]})")
    return "; ".join(diff) or None


def machine_tag() -> str:
    """The victims' folder of one machine kind: the CPU kind (engine.results.cpu_kind: model name,
    family.model.stepping, a hash of the vector instruction sets) and the thread count (victims of different kinds are
    never paired: training is not bit-reproducible across CPUs)."""
    return f"{cpu_kind()}-t{torch.get_num_threads()}"


def victim_dir(args, row: dict, seed: int, machine: str) -> Path:
    return args.work / "victims" / machine / row["arch"] / row["victim"] / row["poison"] / f"seed{seed}"


def stage_victims(args, protocol, train, test, only=None) -> None:
    """Train and certify every victim of the protocol not yet finished on this machine kind (the twins whose crafted
    poison is there are made first). A finished victim whose results are not those of its row now (another poison
    file, other settings) is set aside, not deleted, and trained again."""
    machine = machine_tag()
    print(f"== victims of {machine}", flush=True)
    stage_controls(args, protocol, train)
    for row in protocol["rows"]:
        if only and row["victim"] not in only:
            continue
        ps = identity = None
        if row["kind"] != "clean":
            path = poison_path(args, row["source"], row["eps"], row["kind"])
            why = "" if path.exists() else f"waiting for {path.name}"
            if not why and row["kind"] == "twin" and (problem := twin_problem(args, row["source"], row["eps"])):
                why = f"{path.name} is not usable: {problem}"
            if why:
                print(f"== {row['arch']} / {row['victim']} / {row['poison']}: {why}")
                continue
            ps = PoisonSet.load(path, train)
            identity = init_record(ps)["sha256"]  # of the poison loaded (the file may be replaced meanwhile)
        for seed in row["seeds"]:
            out = victim_dir(args, row, seed, machine)
            try:  # one process per victim, from the look at its summary to the summary written (<folder>.lock)
                lock = ExclusiveLock(out).acquire()
            except FileInUseError:  # another process has it: go on with the next victim
                print(f"== victim {row['arch']} / {row['victim']} / {row['poison']} / seed {seed}: skipped, another "
                      "process has it", flush=True)
                continue
            try:
                _victim_unless_done(args, protocol, row, seed, ps, identity, train, test, out)
            finally:
                lock.release()


def _victim_unless_done(args, protocol, row, seed, ps, identity, train, test, out) -> None:
    """Train and certify the victim in ``out`` unless its results are there and are this row's (other results are
    set aside first). The caller holds the victim's lock."""
    if (out / "summary.json").exists():
        problem = victim_problem(json.loads((out / "summary.json").read_text()), protocol, row, seed, identity)
        if problem is None:
            return
        moved = set_aside(out)
        print(f"== victim {out}: its results are not this row's ({problem}); set aside as "
              f"{moved.name if moved else 'another process did (it trains it again)'}", flush=True)
        if moved is None:
            return
    print(f"== victim {row['arch']} / {row['victim']} / {row['poison']} / seed {seed}", flush=True)
    try:
        _victim(args, protocol, row, seed, ps, train, test, out)
    except FileInUseError as exc:  # a process outside this driver writes one of its files: go on with the next
        print(f"== skipped, {exc}", flush=True)
        return
    _keep_victim(args, out)


def victim_training(protocol: dict, row: dict, seed: int) -> dict:
    """The training arguments of evaluate_poison for ``row`` and ``seed``: the names and values its victims record
    as ``train_settings``."""
    v, proc = protocol["victims"], row["victim"]
    return {"arch": row["arch"], "victim_method": proc, "sigma": float(v["sigma"][proc]), "epochs": v["epochs"][proc],
            "batch_size": v["batch_size"], "lr": float(v["lr"]), "optimizer": v["optimizer"],
            "schedule": v["schedule"], "seed": seed, "method_args": v["method_args"][proc]}


def _victim(args, protocol, row, seed, ps, train, test, out) -> None:
    c = protocol["certification"]
    evaluate_poison(ps, train, test, **victim_training(protocol, row, seed), target_class=TARGET,
                    n_images=c["images"], n0=c["n0"], n=c["n"], alpha=c["alpha"], out_dir=out, device="cpu",
                    dataset="mnist", progress=not args.quiet)


def _radii(directory: Path) -> dict[int, float]:
    return {k: r[3] * r[4] for k, r in read_log(directory / "certify.tsv")[1].items()}


def _bootstrap(triples, reps: int, level: float, rng) -> tuple[list[float], list[float]]:
    """Intervals of (drop, drop minus twin) resampling seeds, then images within each; ``triples`` per seed:
    (clean radii, poisoned radii, twin radii or None) as arrays over the same images (every victim of the protocol
    certifies the same test images). Vectorised over the resamples, in chunks of 1,000."""
    sizes = {len(t[0]) for t in triples} | {len(t[1]) for t in triples}
    if len(sizes) != 1:
        raise SystemExit(f"the victims paired in a row certified different numbers of images ({sorted(sizes)})")
    n, k = sizes.pop(), len(triples)
    clean, poisoned = np.stack([t[0] for t in triples]), np.stack([t[1] for t in triples])
    twin = None if any(t[2] is None for t in triples) else np.stack([t[2] for t in triples])
    drops, diffs = [], []
    for start in range(0, reps, 1000):
        m = min(1000, reps - start)
        seeds = rng.integers(0, k, (m, k))[..., None]
        images = rng.integers(0, n, (m, k, n))
        sc, sp = clean[seeds, images].sum(axis=(1, 2)), poisoned[seeds, images].sum(axis=(1, 2))
        st = twin[seeds, images].sum(axis=(1, 2)) if twin is not None else np.full(m, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            drops.append(np.where(sc > 0, 1 - sp / sc, np.nan))
            diffs.append(np.where(sc > 0, (st - sp) / sc, np.nan))
    drops, diffs = np.concatenate(drops), np.concatenate(diffs)
    q = [50 * (1 - level), 50 * (1 + level)]
    lo_hi = [float(x) for x in np.nanpercentile(drops, q)] if not np.all(np.isnan(drops)) else [None, None]
    lo_hi_t = [float(x) for x in np.nanpercentile(diffs, q)] if not np.all(np.isnan(diffs)) else [None, None]
    return lo_hi, lo_hi_t


def _summary(args, protocol: dict, row: dict, seed: int, machine: str) -> dict | None:
    """A finished victim's summary.json, refused (SystemExit) where its results are not this row's now."""
    path = victim_dir(args, row, seed, machine) / "summary.json"
    if not path.exists():
        return None
    identity = None
    if row["kind"] != "clean":
        poison_file = poison_path(args, row["source"], row["eps"], row["kind"])
        if not poison_file.exists():
            how = ("craft it (--stage craft) or put it back; the finished crafted poisons are taken from "
                   "results/kept" if row["kind"] == "crafted" else
                   "run --stage controls (it makes the controls again from their seed)")
            raise SystemExit(f"{path.parent}: a finished victim of {poison_file.name}, which is missing: {how}")
        if row["kind"] == "twin" and (why := twin_problem(args, row["source"], row["eps"])):
            raise SystemExit(f"{poison_file}: {why}: run --stage controls (it makes the twin again) and then "
                             "--stage victims")
        identity = read_poison_header(poison_file)["sha256"]
    summary = json.loads(path.read_text())
    problem = victim_problem(summary, protocol, row, seed, identity)
    if problem is not None:
        raise SystemExit(f"{path.parent}: its results are not those of this row now ({problem}): run --stage victims "
                         "(it sets the victim aside, trains it again and replaces its copy in results/kept), or move "
                         "it away from both the work folder and results/kept")
    return summary


def summarise_rows(args, protocol, machine: str, reps: int, level: float) -> list[dict]:
    """Every protocol row from the victims of one machine kind (the clean and twin victims paired by seed). A row's
    own columns (ACR, smoothed accuracy, clean accuracies) cover its finished seeds (``seeds``); the drop, the cost and
    their intervals cover those with a clean victim too (``paired_seeds``); ``complete`` when both are every seed of
    the protocol's row. Each row's bootstrap has its own generator, keyed by the row and machine."""
    rows = protocol["rows"]
    rows_out = []
    for row in rows:
        summaries = {s: x for s in row["seeds"] if (x := _summary(args, protocol, row, s, machine)) is not None}
        done = sorted(summaries)
        clean_row = next((r for r in rows if r["kind"] == "clean" and r["victim"] == row["victim"]
                          and r["arch"] == row["arch"]), None)
        twin_row = None if row["kind"] in ("clean", "twin") else next(
            (r for r in rows if r["kind"] == "twin" and r["victim"] == row["victim"] and r["arch"] == row["arch"]
             and r["eps"] == row["eps"] and r["source"] == row["source"]), None)
        clean = {} if clean_row is None else {
            s: x for s in done if (x := _summary(args, protocol, clean_row, s, machine)) is not None}
        paired = sorted(clean)
        twins = {} if twin_row is None else {
            s: x for s in paired if (x := _summary(args, protocol, twin_row, s, machine)) is not None}
        control = row["kind"] if row["kind"] not in ("clean", "crafted") else None
        out = {"table": row["table"], "arch": row["arch"], "victim": row["victim"], "poison": row["poison"],
               "source": row["source"], "kind": "control" if control else row["kind"], "control": control,
               "eps": row["eps"], "machine": machine, "seeds": done, "paired_seeds": paired,
               "missing_seeds": [s for s in row["seeds"] if s not in done],
               "complete": done == sorted(row["seeds"]) and (row["kind"] == "clean" or paired == done),
               "images": protocol["certification"]["images"], "n": protocol["certification"]["n"],
               "outer_steps": _outer_steps(args, protocol, row) if row["kind"] == "crafted" else None}
        out["acr_poisoned"] = [summaries[s]["acr"] for s in done]
        out["acr_clean"] = [clean[s]["acr"] for s in paired]
        out["smoothed_acc"] = [summaries[s]["certified_accuracy"].get("0") for s in done]
        out["radius_given_correct"] = [
            (summaries[s]["acr"] / summaries[s]["certified_accuracy"]["0"]) if summaries[s]["certified_accuracy"].get("0")
            else None for s in done]
        out["clean_acc_target"] = [summaries[s]["clean_accuracy_target"] for s in done]
        out["clean_acc_other"] = [summaries[s]["clean_accuracy_other_classes"] for s in done]
        # the price: the clean victim's accuracy on the class minus this victim's, seed by seed
        out["cost_target"] = _mean([clean[s]["clean_accuracy_target"] - summaries[s]["clean_accuracy_target"]
                                    for s in paired]) if row["kind"] != "clean" else 0.0
        out["acr_drop_per_seed"] = {str(s): (1 - summaries[s]["acr"] / clean[s]["acr"]) if clean[s]["acr"] > 0 else None
                                    for s in paired} if row["kind"] != "clean" else {}
        machines = {(x["trace"].get("cpu"), x["trace"].get("threads")) for x in (*summaries.values(), *clean.values(),
                                                                                 *twins.values())}
        out["cpu"] = sorted({m[0] for m in machines if m[0]})
        out["threads"] = sorted({m[1] for m in machines if m[1]})
        out["same_machine_kind"] = len(machines) <= 1
        out.update(acr_drop=None, acr_drop_ci95=[None, None], drop_minus_twin=None, drop_minus_twin_ci95=[None, None])
        if row["kind"] != "clean" and paired:
            triples = []
            for s in paired:
                rc = _radii(victim_dir(args, clean_row, s, machine))
                rp = _radii(victim_dir(args, row, s, machine))
                keys = sorted(rc)
                rt = _radii(victim_dir(args, twin_row, s, machine)) if s in twins else None
                triples.append((np.array([rc[k] for k in keys]), np.array([rp[k] for k in keys]),
                                None if rt is None else np.array([rt[k] for k in keys])))
            sc, sp = sum(t[0].sum() for t in triples), sum(t[1].sum() for t in triples)
            out["acr_drop"] = float(1 - sp / sc) if sc > 0 else None
            if all(t[2] is not None for t in triples):
                out["drop_minus_twin"] = float((sum(t[2].sum() for t in triples) - sp) / sc) if sc > 0 else None
            key = f"{machine}/{row['arch']}/{row['victim']}/{row['poison']}".encode()
            ci, ci_t = _bootstrap(triples, reps, level, np.random.default_rng([0, zlib.crc32(key)]))
            out["acr_drop_ci95"] = ci
            if out["drop_minus_twin"] is not None:
                out["drop_minus_twin_ci95"] = ci_t
        rows_out.append(out)
    return rows_out


def _outer_steps(args, protocol: dict, row: dict) -> int:
    """The outer steps of a crafted row's poison: as its file records them, else (not yet crafted) the protocol's."""
    path = poison_path(args, row["source"], row["eps"], "crafted")
    if path.exists():
        return int(read_poison_header(path)["meta"]["settings"]["outer_steps"])
    return protocol["crafting"]["settings"][row["source"]]["outer_steps"]


def _mean(xs):
    return None if not xs or any(x is None for x in xs) else float(np.mean(xs))


def goal_verdicts(rows: list[dict]) -> dict:
    """The issue's goal on one machine kind's main (LeNet) rows; a verdict is None until every row it rests on is
    complete (all of the protocol's seeds, each with its clean victim).

    At eps 0.1, per procedure: ``twin_goal``, the crafted poison lowers the ACR by >= 15 points (of the clean ACR)
    more than its twin with the interval above 0; ``frontier_goal``, it lowers the ACR (drop > 0) and by more than
    every control whose cost (the clean victims' accuracy on the class minus the row's, paired by seed) is no larger
    than its own. At eps 0.03 and 0.05 (Gaussian augmentation): the crafted poison lowers the ACR and its drop is at
    least twice the vertex control's (or any drop, where the vertex control raises the ACR)."""
    main = [r for r in rows if r["table"] == "main"]
    out = {}

    def find(victim, eps, kind):
        return next((r for r in main if r["victim"] == victim and r["eps"] == eps
                     and (r["control"] or r["kind"]) == kind), None)

    for proc in PROCEDURES:
        crafted = find(proc, 0.1, "crafted")
        if crafted is None:
            continue
        controls = [r for r in main if r["victim"] == proc and r["eps"] == 0.1 and r["kind"] == "control"]
        complete = crafted["complete"] and all(r["complete"] for r in controls)
        v = {"drop": crafted["acr_drop"], "cost": crafted["cost_target"], "drop_minus_twin": crafted["drop_minus_twin"],
             "drop_minus_twin_ci95": crafted["drop_minus_twin_ci95"], "complete": complete, "twin_goal": None,
             "frontier_goal": None, "controls_no_costlier": None, "met": None}
        if complete and any(r["acr_drop"] is None for r in (crafted, *controls)):  # a clean ACR of 0: no drop
            v["undefined"] = "the clean victims certify no image: no ACR drop is defined"
        elif complete:
            lo = crafted["drop_minus_twin_ci95"][0]
            v["twin_goal"] = bool(crafted["drop_minus_twin"] is not None and crafted["drop_minus_twin"] >= 0.15
                                  and lo is not None and lo > 0)
            cheaper = [r for r in controls if r["cost_target"] <= crafted["cost_target"]]
            v["controls_no_costlier"] = {r["control"]: {"drop": r["acr_drop"], "cost": r["cost_target"]}
                                         for r in cheaper}
            v["frontier_goal"] = bool(crafted["acr_drop"] > 0 and all(crafted["acr_drop"] > r["acr_drop"]
                                                                      for r in cheaper))
            v["met"] = v["twin_goal"] and v["frontier_goal"]
        out[f"{proc}-eps0.1"] = v
    for eps in LOW_EPS:
        crafted, vertex = find("gaussian", eps, "crafted"), find("gaussian", eps, "vertex")
        if crafted is None or vertex is None:
            continue
        complete = crafted["complete"] and vertex["complete"]
        v = {"drop": crafted["acr_drop"], "vertex_drop": vertex["acr_drop"], "complete": complete, "met": None}
        if complete and (crafted["acr_drop"] is None or vertex["acr_drop"] is None):
            v["undefined"] = "the clean victims certify no image: no ACR drop is defined"
        elif complete:
            v["met"] = bool(crafted["acr_drop"] > 0 and crafted["acr_drop"] >= 2 * max(vertex["acr_drop"], 0.0))
        out[f"gaussian-eps{eps:g}"] = v
    return out


def _machines(args) -> list[str]:
    """The machine kinds (folders named by :func:`machine_tag`) with a finished victim (this one when none has)."""
    root = args.work / "victims"
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and re.search(r"-t\d+$", d.name)
                   and any(d.rglob("summary.json"))) if root.exists() else []
    return found or [machine_tag()]


def stage_summary(args, protocol) -> dict:
    reps = 200 if args.dry_run else protocol["intervals"]["reps"]
    level = protocol["intervals"]["level"]
    rows, goal = [], {}
    for machine in _machines(args):
        got = summarise_rows(args, protocol, machine, reps, level)
        rows += got
        goal[machine] = goal_verdicts(got)
    summary = {"protocol": json.loads((args.results / "protocol.json").read_text()), "rows": rows, "goal": goal,
               "written": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_markdown(args, summary)
    plot_frontier(args, summary)
    print(f"wrote {args.results / 'summary.json'}, results.md, drop_vs_accuracy.png")
    return summary


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(xs):
    m = _mean(xs)
    return "-" if m is None else f"{m:.4f}"


def transfer_cell(rows: list[dict], poison: str, victim: str, arch: str) -> dict | None:
    """The row of ``poison`` (a crafted-for procedure, "vertex" or "clean") against ``victim`` / ``arch``: the main
    row where the table reuses it (LeNet, the poison's own procedure, the vertex control)."""
    for r in rows:
        if r["victim"] != victim or r["arch"] != arch:
            continue
        if poison == "clean" and r["kind"] == "clean":
            return r
        if poison == "vertex" and r["control"] == "vertex" and r["eps"] == 0.1:
            return r
        if r["kind"] == "crafted" and r["source"] == poison and r["eps"] == 0.1:
            return r
    return None


def _settings_line(protocol: dict) -> str:
    """The victims' training and certification settings, as the protocol fixes them."""
    v, c = protocol["victims"], protocol["certification"]
    procs = ", ".join(f"{p} {v['epochs'][p]} epochs, sigma {v['sigma'][p]:g}"
                      + (f" ({', '.join(f'{k} {a:g}' for k, a in v['method_args'][p].items())})"
                         if v["method_args"][p] else "") for p in PROCEDURES)
    return (f"Victims ({' and '.join(v['arch']['transfer'])}, trained from scratch): {procs}; {v['optimizer']} lr "
            f"{v['lr']:g}, {v['schedule']} schedule, batch {v['batch_size']}. Certification: {c['images']} test images "
            f"of class {protocol['target_class']} (seed {c['image_seed']}, the same for every row), n0 {c['n0']}, "
            f"n {c['n']:,}, alpha {c['alpha']:g}.")


def write_markdown(args, summary) -> None:
    lines = ["# PACD against random controls (MNIST, class 8)", "",
             "Protocol: `protocol.json` (fixed before the runs, amended before any victim: see its `amendments`). "
             "Every row of the protocol is listed; missing seeds are victims not yet run. Victims are paired only "
             "within one machine kind (CPU model, family.model.stepping, vector instruction sets, threads), one "
             "section each. Cost: the clean victims' clean accuracy on class 8 minus the row's, paired by seed. "
             "ACR drop: 1 - (the poisoned victims' summed radii) / (the clean victims' summed radii) over the paired "
             "seeds and images; drop minus twin: (the twin's summed radii - the poison's) / the clean victims'.", "",
             _settings_line(summary["protocol"]), ""]
    fmt = {True: "yes", False: "no", None: "-"}
    for machine, goal in summary["goal"].items():
        rows = [r for r in summary["rows"] if r["machine"] == machine]
        lines += [f"## Victims of `{machine}`", "", "### Main table (LeNet)", "",
                  "| victim | poison | eps | seeds | ACR clean | ACR poisoned | ACR drop [95%] | drop minus twin [95%] "
                  "| smoothed acc | radius of correct | clean acc target / other | cost | missing |", "|" + "---|" * 13]
        for r in rows:
            if r["table"] != "main":
                continue
            ci, cit = r["acr_drop_ci95"], r["drop_minus_twin_ci95"]
            lines.append(
                f"| {r['victim']} | {r['poison']} | {r['eps'] if r['eps'] is not None else '-'} | {len(r['seeds'])} | "
                f"{_num(r['acr_clean'])} | {_num(r['acr_poisoned'])} | {_pct(r['acr_drop'])} [{_pct(ci[0])}, "
                f"{_pct(ci[1])}] | {_pct(r['drop_minus_twin'])} [{_pct(cit[0])}, {_pct(cit[1])}] | "
                f"{_num(r['smoothed_acc'])} | {_num(r['radius_given_correct'])} | {_num(r['clean_acc_target'])} / "
                f"{_num(r['clean_acc_other'])} | {_num([r['cost_target']]) if r['kind'] != 'clean' else '-'} | "
                f"{r['missing_seeds'] or '-'} |")
        lines += ["", "### Goal", "",
                  "At eps 0.1: drop minus twin >= 15 points with its interval above 0 (twin goal), and an ACR drop "
                  "above 0 and above every control's whose cost is no larger (frontier goal); at eps 0.03 / 0.05 (GA): "
                  "a drop above 0 and at least twice the vertex control's. `-` until every row a verdict rests on has "
                  "all its seeds.", "",
                  "| poison | ACR drop | cost | twin goal | frontier goal | met |", "|---|---|---|---|---|---|"]
        for name, v in goal.items():
            lines.append(f"| {name} | {_pct(v['drop'])} | {_num([v.get('cost')])} | {fmt[v.get('twin_goal')]} | "
                         f"{fmt[v.get('frontier_goal')]} | {fmt[v['met']]} |")
        archs = list(summary["protocol"]["victims"]["arch"]["transfer"])
        cols = [(v, a) for a in archs for v in PROCEDURES]
        lines += ["", "### Transfer (eps 0.1): ACR drop of the victims of seed 0 (every cell alike; the main table has "
                  "the 3-seed rows); the clean row gives the clean victims' ACR", "",
                  "| poison \\ victim | " + " | ".join(f"{v} / {a}" for v, a in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for name in ("clean", *PROCEDURES, "vertex"):
            cells = []
            for v, a in cols:
                r = transfer_cell(rows, name, v, a)
                if r is None or 0 not in r["seeds"]:
                    cells.append("-")
                elif name == "clean":
                    cells.append(f"{r['acr_poisoned'][r['seeds'].index(0)]:.4f}")
                else:
                    cells.append(_pct(r["acr_drop_per_seed"].get("0")))
            label = {"clean": "clean (ACR)", "vertex": "vertex control"}.get(name, f"crafted for {name}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    (args.results / "results.md").write_text("\n".join(lines) + "\n")


def plot_frontier(args, summary) -> None:
    """ACR drop against its cost on the target class's clean accuracy, one panel per procedure (main rows of the
    machine kind with the most finished victims), with the controls' frontier: the most drop of any control at that
    cost or less."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = {m: sum(len(r["seeds"]) for r in summary["rows"] if r["machine"] == m) for m in summary["goal"]}
    machine = max(count, key=count.get)
    rows = [r for r in summary["rows"] if r["machine"] == machine and r["table"] == "main" and r["kind"] != "clean"
            and r["acr_drop"] is not None and r["cost_target"] is not None]
    panels = [(p, (0.1,)) for p in PROCEDURES] + [("gaussian", LOW_EPS)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), dpi=120, squeeze=False)
    for ax, (proc, eps_set) in zip(axes[0], panels):
        pts = [r for r in rows if r["victim"] == proc and r["eps"] in eps_set]
        right = max([100 * r["cost_target"] for r in pts], default=0.0)
        for i, eps in enumerate(eps_set):
            colour = f"C{i}"
            ctrl = sorted((100 * r["cost_target"], 100 * r["acr_drop"]) for r in pts
                          if r["eps"] == eps and r["kind"] == "control")
            if ctrl:  # from the cheapest control up: the most drop at that cost or less, on to the panel's edge
                xs, ys, best = [], [], -np.inf
                for c, d in ctrl:
                    best = max(best, d)
                    xs.append(c)
                    ys.append(best)
                xs.append(max(right, xs[-1]))
                ys.append(best)
                ax.step(xs, ys, where="post", color=colour, lw=1, alpha=0.5)
            for r in pts:
                if r["eps"] != eps:
                    continue
                crafted = r["kind"] == "crafted"
                x, y = 100 * r["cost_target"], 100 * r["acr_drop"]
                ax.scatter(x, y, marker="*" if crafted else "o", s=90 if crafted else 25,
                           color="C3" if crafted and len(eps_set) == 1 else colour,
                           edgecolors="k" if crafted else "none")
                ax.annotate(f"{r['control'] or 'crafted'}" + (f" {eps:g}" if len(eps_set) > 1 else ""), (x, y),
                            fontsize=6)
        ax.axvline(0, color="k", ls=":", lw=1)  # the clean victims' accuracy: no cost
        ax.set_title(f"{proc} victims, eps {', '.join(f'{e:g}' for e in eps_set)}", fontsize=9)
        ax.set_xlabel("cost: clean accuracy on class 8 lost (points)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ACR drop (%)")
    fig.suptitle(f"ACR drop against its cost (stars: crafted; lines: the controls' frontier); {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.results / "drop_vs_accuracy.png")
    plt.close(fig)


def _victim_seconds(secs: dict, protocol: dict, row: dict) -> float:
    """One victim of ``row`` at estimate.json's timings ``secs``: its training epochs and its certified images."""
    suffix = "" if row["arch"] == "lenet" else f"_{row['arch']}"
    return (secs[row["victim"]][f"victim_epoch{suffix}"] * protocol["victims"]["epochs"][row["victim"]]
            + secs[f"certify_image{suffix}"] * protocol["certification"]["images"])


def stage_estimate(args, protocol, train, val, test) -> None:
    """Seconds of one outer step per procedure, one victim epoch per procedure and architecture and one certified
    image per architecture, then the CPU hours of the protocol. Timings already in estimate.json from this CPU model
    and thread count are kept (``timed`` says when each was taken); the others are timed now."""
    path = args.results / "estimate.json"
    trace = run_trace()
    old = json.loads(path.read_text()) if path.exists() else {}
    tag = machine_tag()
    # timings are kept from the same machine kind (a file written before the tag existed: the same model name)
    same = old.get("machine_tag", tag) == tag and old.get("machine", {}).get("cpu") == trace["cpu"] \
        and old.get("threads") == torch.get_num_threads()
    secs = old.get("seconds", {}) if same else {}
    timed = old.get("timed", {}) if same else {}
    if same and "timed" not in old:
        timed = {"first": old["machine"].get("written")}
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    v, c = protocol["victims"], protocol["certification"]
    from engine import train as train_fn
    from engine.pacd import Crafter, PoisonConfig
    from engine.smoothing import certify

    for proc in PROCEDURES:
        secs.setdefault(proc, {})
        if "outer_step" not in secs[proc]:
            # a step whose upper objective counts no validation image skips the solve: time steps until one solves
            settings = {**protocol["crafting"]["settings"][proc], "outer_steps": 12}
            crafter = Crafter(lambda: models.build("lenet"), train, val, TARGET,
                              PoisonConfig(**settings, method=proc, seed=0))
            step, seen = None, []
            for _ in range(settings["outer_steps"]):
                entry = crafter.step()
                seen.append(entry["seconds"])
                if entry["phases"].get("solve", 0.0) > 0:
                    step = entry["seconds"]
                    break
            secs[proc]["outer_step"] = max(seen) if step is None else step
            timed[f"{proc}/outer_step"] = now
        for arch in TRANSFER_ARCHS:
            key = "victim_epoch" if arch == "lenet" else f"victim_epoch_{arch}"
            if key in secs[proc]:
                continue
            sub = 2000 if not args.dry_run else 64
            kwargs = dict(method=proc, sigma=v["sigma"][proc], epochs=1, batch_size=v["batch_size"], lr=v["lr"],
                          progress=False, **{**v["method_args"][proc], **({"lbd_warmup": 0} if proc == "macer" else {}),
                                             **({"warmup": 1} if proc == "smoothadv" else {})})
            train_fn(models.build(arch), (train[0][:128], train[1][:128]), **kwargs)  # warm-up, not timed
            t = time.perf_counter()
            train_fn(models.build(arch), (train[0][:sub], train[1][:sub]), **kwargs)
            secs[proc][key] = (time.perf_counter() - t) * train[0].shape[0] / sub
            timed[f"{proc}/{key}"] = now
    for arch in TRANSFER_ARCHS:
        key = "certify_image" if arch == "lenet" else f"certify_image_{arch}"
        if key in secs:
            continue
        model = models.build(arch).eval()
        ids = torch.tensor(target_test_indices(test[1], TARGET, 2))
        certify(model, data.to_float(test[0][ids[:1]]), sigma=0.5, n0=c["n0"], n=1000, alpha=c["alpha"],
                image_ids=ids[:1], progress=False)  # warm-up, not timed
        t = time.perf_counter()
        certify(model, data.to_float(test[0][ids]), sigma=0.5, n0=c["n0"], n=c["n"], alpha=c["alpha"], image_ids=ids,
                progress=False)
        secs[key] = (time.perf_counter() - t) / len(ids)
        timed[key] = now
    hours = {"craft": 0.0, "victims": 0.0}
    for proc in PROCEDURES:
        hours["craft"] += secs[proc]["outer_step"] * protocol["crafting"]["settings"][proc]["outer_steps"] * len(
            protocol["crafting"]["eps"][proc]) / 3600
    for row in protocol["rows"]:
        hours["victims"] += _victim_seconds(secs, protocol, row) * len(row["seeds"]) / 3600
    hours["total"] = hours["craft"] + hours["victims"]
    est = {"machine": old["machine"] if same else trace, "machine_tag": tag, "threads": torch.get_num_threads(),
           "seconds": secs,
           "timed": timed, "cpu_hours": {k: round(x, 2) for k, x in hours.items()}}
    path.write_text(json.dumps(est, indent=1) + "\n")
    print(json.dumps(est["cpu_hours"]))


def poison_stats(ps: PoisonSet, train) -> dict:
    """Where a poison spends its budget: the mean perturbation (in units of eps) on the black background of the class's
    images (clean pixel 0) and on their strokes (clean pixel >= 0.5), the share of background pixels made brighter,
    the mean |perturbation| and the share of pixels at the box's edge (|perturbation| >= 0.99 eps)."""
    idx = ps.indices
    x0 = data.to_float(train[0][idx]).flatten(1)
    delta = (ps.images.to(torch.float32).flatten(1) - x0) / ps.eps
    background, stroke = x0 == 0, x0 >= 0.5
    return {"images": int(idx.numel()), "eps": ps.eps,
            "mean_on_background": float(delta[background].mean()), "mean_on_strokes": float(delta[stroke].mean()),
            "background_brightened": float((delta[background] > 1e-3).float().mean()),
            "mean_abs": float(delta.abs().mean()), "at_edge": float((delta.abs() >= 0.99).float().mean())}


def stage_inspect(args, protocol, train) -> None:
    """poison_stats of every poison file there is, and of each crafting checkpoint as it stands (marked with its
    step): a diagnostic of what the poisons do to the images, not a result of the protocol. results/poison_stats.json."""
    out = {"note": "diagnostic, not a protocol result: what each poison does to the class's pixels (units of eps)",
           "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "poisons": {}}
    folder = args.work / "poisons"
    for path in sorted(folder.glob("*.safetensors")):
        out["poisons"][path.stem] = poison_stats(PoisonSet.load(path, train), train)
    for path in sorted(folder.glob("*.safetensors.ckpt")):
        name = path.name.removesuffix(".safetensors.ckpt")
        if name in out["poisons"]:
            continue
        ps = PoisonSet.from_checkpoint(path, train)
        out["poisons"][f"{name} (checkpoint, step {ps.settings['outer_steps']})"] = poison_stats(ps, train)
    for name, st in out["poisons"].items():
        print(f"{name}: background {st['mean_on_background']:+.3f} eps ({100 * st['background_brightened']:.0f}% "
              f"brighter), strokes {st['mean_on_strokes']:+.3f} eps, |delta| {st['mean_abs']:.3f} eps, "
              f"{100 * st['at_edge']:.0f}% at the edge")
    (args.results / "poison_stats.json").write_text(json.dumps(out, indent=1) + "\n")


def stage_status(args, protocol) -> None:
    """Where the work stands: each crafted poison (done, its checkpoint's step, or not started), the victims finished
    per machine kind out of the protocol's, and the CPU hours left by estimate.json's timings."""
    est_path = args.results / "estimate.json"
    secs = json.loads(est_path.read_text())["seconds"] if est_path.exists() else None
    left = 0.0
    for proc in PROCEDURES:
        steps = protocol["crafting"]["settings"][proc]["outer_steps"]
        for eps in protocol["crafting"]["eps"][proc]:
            out = poison_path(args, proc, eps, "crafted")
            ckpt = checkpoint_path(out)
            if out.exists():
                done, state = steps, "done"
            elif ckpt.exists():
                done = int(read_checkpoint(ckpt)[1]["step"])
                state = f"checkpoint at step {done}"
                if (kept_ckpt := kept_checkpoint_path(args, out)).exists():
                    state += f" (kept compact copy at step {read_compact_checkpoint(kept_ckpt)[1]['checkpoint']['step']})"
            else:
                done, state = 0, "not started"
            print(f"craft {out.stem}: {state} of {steps}")
            if secs:
                left += (steps - done) * secs[proc]["outer_step"] / 3600
    total = sum(len(r["seeds"]) for r in protocol["rows"])
    machines = _machines(args)
    for machine in machines:
        missing = [(r, s) for r in protocol["rows"] for s in r["seeds"]
                   if not (victim_dir(args, r, s, machine) / "summary.json").exists()]
        print(f"victims of {machine}: {total - len(missing)} of {total} finished")
    here = machine_tag()
    summaries = [(r, victim_dir(args, r, s, here) / "summary.json") for r in protocol["rows"] for s in r["seeds"]]
    if secs:
        try:  # each victim of this kind at the estimate's timings: (row, seconds, its summary file)
            planned = [(r, _victim_seconds(secs, protocol, r), f) for r, f in summaries]
        except KeyError as exc:
            print(f"{est_path} has no timing {exc}: run --stage estimate for the CPU hours left")
            return
        victims_left = sum(t for _, t, f in planned if not f.exists()) / 3600
        left += victims_left
        print(f"about {left:.1f} CPU hours left for this machine kind ({here}) at estimate.json's timings"
              + ("" if args.threads else "; pass --threads as the victims run (the kind includes the thread count)"))
        # measured against estimated, per procedure and architecture (victims without both timings left out): the
        # wall time of one-thread processes, as the estimate's
        groups: dict[tuple[str, str], list[float]] = {}
        for r, t, f in planned:
            v = json.loads(f.read_text()) if f.exists() else {}
            if v.get("train_seconds") is not None and v.get("certify_seconds") is not None:
                g = groups.setdefault((r["victim"], r["arch"]), [0, 0.0, 0.0])
                g[0] += 1
                g[1] += v["train_seconds"] + v["certify_seconds"]
                g[2] += t
        if groups:
            took, expected = sum(g[1] for g in groups.values()), sum(g[2] for g in groups.values())
            each = ", ".join(f"{proc}/{arch} {g[1] / g[2]:.2f} ({g[0]})" for (proc, arch), g in sorted(groups.items()))
            print(f"finished victims of this kind with timings took {took / 3600:.2f} hours of one-thread wall time, "
                  f"{took / expected:.2f} times the estimate's {expected / 3600:.2f} (per procedure/arch, victims: "
                  f"{each}); the victims left at that ratio: {victims_left * took / expected:.1f} hours (the "
                  f"estimate's: {victims_left:.1f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("protocol", "estimate", "craft", "controls", "victims", "summary", "status",
                                       "inspect", "all"),
                   default="all")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--work", type=Path, default=Path("runs/pacd_controls"), help="poisons, checkpoints and victims")
    p.add_argument("--results", type=Path, default=HERE / "results", help="protocol, estimate and summaries")
    p.add_argument("--only", default=None, help="procedures this process works on (craft, victims), e.g. gaussian")
    p.add_argument("--eps", default=None,
                   help="with --stage craft: only the poisons of these eps (of the --only procedures), e.g. 0.1")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the embedded MNIST subset")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--amend", action="store_true",
                   help="with --stage protocol: replace the stored protocol by this driver's (refused once any victim "
                        "exists, or if the crafting, data or certification would change)")
    args = p.parse_args(argv)
    from engine.distributed import env_world_size

    if env_world_size() > 1 and args.stage != "craft":
        p.error(f"--stage {args.stage} runs in one process; only --stage craft runs under torchrun (WORLD_SIZE > 1)")
    if args.stage in ("victims", "all") and not args.threads:
        p.error(f"--stage {args.stage} needs --threads: the victims' machine kind includes the thread count, and "
                "victims of another kind are never paired (the protocol's victims run with --threads 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else None
    if only and (unknown := sorted(only - set(PROCEDURES))):
        p.error(f"--only {args.only}: {', '.join(unknown)} is not a procedure ({', '.join(PROCEDURES)})")
    eps_only = None
    if args.eps is not None:
        if args.stage != "craft":
            p.error("--eps selects poisons to craft: it goes with --stage craft")
        try:
            eps_only = {float(e) for e in args.eps.split(",")}
        except ValueError:
            p.error(f"--eps {args.eps}: not a comma-separated list of numbers")
    protocol = build_protocol(args)
    if eps_only:
        crafted = {float(e) for proc in (only or PROCEDURES) for e in protocol["crafting"]["eps"][proc]}
        if unknown := sorted(eps_only - crafted):
            p.error(f"--eps {args.eps}: the protocol crafts no poison of eps {', '.join(map(str, unknown))} for "
                    f"{', '.join(sorted(only or PROCEDURES))} (its eps: {', '.join(map(str, sorted(crafted)))})")
    if args.stage == "protocol":
        write_protocol(args, protocol)
        return 0
    if args.stage == "all" and not (args.results / "protocol.json").exists():
        write_protocol(args, protocol)
    check_protocol(args, protocol)
    if args.stage != "estimate" and (env_world_size() == 1 or os.environ.get("RANK") == "0"):
        sync_kept(args, protocol)  # under torchrun rank 0 alone, before the ranks meet (engine.distributed.init_from_env)
    if args.stage == "status":
        stage_status(args, protocol)
        return 0
    if args.stage == "summary":  # reads the victims' files (the sync may have loaded the training split)
        stage_summary(args, protocol)
        return 0
    train, val, test = load_data(args, protocol)
    if args.stage == "estimate":
        stage_estimate(args, protocol, train, val, test)
    if args.stage == "inspect":
        stage_inspect(args, protocol, train)
    if args.stage in ("craft", "all"):
        stage_craft(args, protocol, train, val, only, eps_only)
    if args.stage in ("controls", "all"):
        stage_controls(args, protocol, train)
    if args.stage in ("victims", "all"):
        stage_victims(args, protocol, train, test, only)
    if args.stage in ("summary", "all"):
        stage_summary(args, protocol)
    print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
