"""PACD on real MNIST, target class 8: craft poisons against Gaussian augmentation (sigma 0.5), MACER
and SmoothAdv (sigma 0.75), evaluate them against victims trained from scratch, and write the tables.

Stage 1 (poison): one poison per procedure (``python -m engine poison`` settings of the paper unless
reduced by flags), resumable from checkpoints under ``--work``.
Stage 2 (main table): for each procedure, a clean and a poisoned LeNet victim trained with that
procedure; ``--images`` random test images of class 8 certified (n0 100, ``--n``, alpha 0.001).
Stage 3 (transfer): every poison (and clean data) x every victim procedure x {LeNet, MLP}, with
``--transfer-images`` / ``--transfer-n``.
Everything resumes: finished poisons, victims and certified images are reused.

    python bench/pacd_mnist_evidence.py --work runs/pacd --outer-steps 2750      (paper setting)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from engine import data, models
from engine.evaluate import acr_drop, evaluate_poison, format_rows
from engine.pacd import PoisonSet, poison

TARGET = 8
SIGMA = {"gaussian": 0.5, "macer": 0.75, "smoothadv": 0.75}
# lower-level procedure settings (ALGORITHMS.md: MACER k_macer 1-2, lambda 1-2, gamma 8, beta 16)
LOWER_ARGS = {
    "gaussian": {},
    "macer": {"k": 2, "lbd": 1.0, "gamma": 8.0, "beta": 16.0},
    "smoothadv": {"eps": 0.5, "steps": 10, "m": 1},
}


def victim_args(method: str, epochs: int) -> dict:
    """Victim training settings: those of the issue-3 evidence (bench/train_mnist_evidence.py)."""
    if method == "macer":
        return {"k": 16, "lbd": 4.0, "gamma": 8.0, "beta": 16.0}
    if method == "smoothadv":
        return {"eps": 1.0, "steps": 10, "m": 1, "warmup": min(2, epochs)}
    return {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="/work/shared/data/mnist")
    p.add_argument("--work", default="runs/pacd")
    p.add_argument("--out", default="bench/results/pacd_mnist")
    p.add_argument("--methods", default="gaussian,macer,smoothadv")
    p.add_argument("--outer-steps", type=int, default=2750)
    p.add_argument("--reset-every", type=int, default=10)
    p.add_argument("--lr-u", type=float, default=0.1)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--victim-epochs", type=int, default=20)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--transfer", action="store_true", help="also run the transfer matrix")
    p.add_argument("--transfer-images", type=int, default=100)
    p.add_argument("--transfer-n", type=int, default=10_000)
    p.add_argument("--transfer-epochs", type=int, default=None)
    p.add_argument("--archs", default="lenet,mlp")
    p.add_argument("--stage", choices=("poison", "main", "all"), default="all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--val-size", type=int, default=5000, help="validation images held out of the training set")
    p.add_argument("--train-size", type=int, default=None, help="use a random subset of this many training images "
                   "(smoke tests; default: all)")  # fmt: skip
    p.add_argument("--batch-clean", type=int, default=900)
    p.add_argument("--batch-poison", type=int, default=100)
    p.add_argument("--batch-val", type=int, default=100)
    p.add_argument("--k", type=int, default=20, help="noise draws of the upper objective")
    p.add_argument("--niter1", type=int, default=10)
    p.add_argument("--niter2", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=5, help="outer steps between poison checkpoints")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    images, labels = data.load_mnist(args.data_root, "train")
    if args.train_size is not None:
        keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[: args.train_size].sort().values
        images, labels = images[keep], labels[keep]
    train, val = data.split_validation(images, labels, args.val_size)
    test = data.load_mnist(args.data_root, "test")
    methods = args.methods.split(",")
    commands = {"evidence": " ".join(["python", *sys.argv])}

    poisons: dict[str, PoisonSet] = {}
    for m in methods:
        path = work / f"poison_{m}.safetensors"
        if path.exists() and PoisonSet.load(path).settings.get("outer_steps", -1) >= args.outer_steps:
            poisons[m] = PoisonSet.load(path)
            continue
        t0 = time.perf_counter()
        print(f"== crafting poison against {m} (sigma {SIGMA[m]}, {args.outer_steps} outer steps)", flush=True)
        ps = poison(
            models.lenet_mnist,
            train,
            val,
            target_class=TARGET,
            method=m,
            sigma=SIGMA[m],
            eps=args.eps,
            outer_steps=args.outer_steps,
            reset_every=args.reset_every,
            lr_u=args.lr_u,
            method_args=LOWER_ARGS[m],
            batch_clean=args.batch_clean,
            batch_poison=args.batch_poison,
            batch_val=args.batch_val,
            k=args.k,
            niter1=args.niter1,
            niter2=args.niter2,
            checkpoint=work / f"poison_{m}.ckpt",
            checkpoint_every=args.checkpoint_every,
            device=args.device,
            progress=True,
        )
        ps.settings.update({"arch": "lenet", "dataset": "mnist", "val_size": args.val_size, "train_size": args.train_size,
                           "wall_seconds_last_invocation": time.perf_counter() - t0})
        ps.save(path)
        poisons[m] = ps
    if args.stage == "poison":
        return 0

    rows, main = [], {}
    for m in methods:
        common = dict(
            victim_method=m,
            arch="lenet",
            sigma=SIGMA[m],
            epochs=args.victim_epochs,
            method_args=victim_args(m, args.victim_epochs),
            n_images=args.images,
            n=args.n,
            device=args.device,
            progress=True,
        )
        print(f"== main table: {m} victims", flush=True)
        clean = evaluate_poison(None, train, test, target_class=TARGET, out_dir=work / f"main/{m}/clean", **common)
        bad = evaluate_poison(poisons[m], train, test, out_dir=work / f"main/{m}/poisoned", **common)
        rows += [clean, bad]
        main[m] = {"clean": clean, "poisoned": bad, "acr_drop": acr_drop(clean, bad)}
    transfer, transfer_rows = {}, []
    if args.transfer and args.stage == "all":
        epochs = args.transfer_epochs or args.victim_epochs
        for arch in args.archs.split(","):
            for victim in methods:
                common = dict(
                    victim_method=victim,
                    arch=arch,
                    sigma=SIGMA[victim],
                    epochs=epochs,
                    method_args=victim_args(victim, epochs),
                    n_images=args.transfer_images,
                    n=args.transfer_n,
                    device=args.device,
                    progress=True,
                )
                print(f"== transfer: {arch} {victim} victims", flush=True)
                clean = evaluate_poison(
                    None, train, test, target_class=TARGET, out_dir=work / f"transfer/{arch}/{victim}/clean", **common
                )
                transfer_rows.append(clean)
                for crafted in methods:
                    bad = evaluate_poison(
                        poisons[crafted], train, test, out_dir=work / f"transfer/{arch}/{victim}/{crafted}", **common
                    )
                    transfer_rows.append(bad)
                    transfer[f"{crafted}->{victim}/{arch}"] = {
                        "clean_acr": clean["acr"],
                        "poisoned_acr": bad["acr"],
                        "acr_drop": acr_drop(clean, bad),
                    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "target_class": TARGET,
        "settings": vars(args),
        "commands": commands,
        "poisons": {m: {k: v for k, v in ps.settings.items() if k != "history_tail"} for m, ps in poisons.items()},
        "main": main,
        "transfer": transfer,
        "date": time.strftime("%Y-%m-%d"),
        "device": str(args.device),
        "torch": torch.__version__,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        f"# PACD on MNIST, target class {TARGET}",
        "",
        f"Command: `{commands['evidence']}`",
        "",
        "## Main table (victims trained with the procedure the poison was crafted for)",
        "",
        format_rows(rows),
    ]
    if transfer:
        lines += [
            "",
            "## Transfer (poison crafted for the method in the poison column, victim / arch in the first columns)",
            "",
            format_rows(transfer_rows),
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
