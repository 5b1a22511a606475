"""Smoke runs of the experiment drivers under bench/experiments/ at toy settings.

The product's tests never import experiment code: each driver runs here as a separate process, the way a user runs
it, so that a change to the engine that breaks an experiment shows up.
"""

import json
import lzma
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from engine import data
from engine.cli import build_parser
from engine.fileio import ExclusiveLock
from engine.pacd import PoisonSet, init_record

EXPERIMENTS = Path(__file__).resolve().parent.parent / "bench" / "experiments"


def _run(script, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(EXPERIMENTS / script), *map(str, args)], capture_output=True, text=True,
                          env=env)


def test_train_mnist_tiny_end_to_end_and_resume(tmp_path):
    """train_mnist_evidence.py on the embedded subset, then run again (nothing redone)."""
    args = ["--data-root", data.embedded_mnist_root(), "--work-dir", tmp_path / "work", "--results", tmp_path / "table",
            "--methods", "gaussian", "--sigmas", "0.5", "--epochs-gaussian", "1", "--train-size", "256", "--images", "3",
            "--n0", "10", "--n", "100", "--threads", "1", "--quiet"]
    proc = _run("train_mnist/train_mnist_evidence.py", *args)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((tmp_path / "table.json").read_text())
    (row,) = rec["results"]
    assert row["images"] == 3 and row["epochs"] == 1 and row["train_images"] == 256 and 0 <= row["acr"] <= 2
    assert set(row["certified_accuracy"]) == {"0", "0.5", "1", "1.5"} and "engine train" in row["train_command"]
    table = (tmp_path / "table.md").read_text()
    assert "| gaussian" in table and "certify s/image" in table
    proc = _run("train_mnist/train_mnist_evidence.py", *args)
    assert proc.returncode == 0 and "training skipped" in proc.stdout
    assert len((tmp_path / "work" / "gaussian_sigma0.5" / "certify.tsv").read_text().splitlines()) == 4


def test_train_mnist_commands_parse_with_the_cli():
    """The per-sigma MACER settings reach the train command line, and the train CLI accepts every flag passed."""
    proc = _run("train_mnist/train_mnist_evidence.py", "--print-commands", "--methods", "macer", "--sigmas", "0.25", "0.5",
                "--epochs-macer", "5", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    cmds = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert len(cmds) == 2
    parsed = [build_parser().parse_args(cmd[cmd.index("engine") + 1:]) for cmd in cmds]
    for p, sigma in zip(parsed, (0.25, 0.5)):
        assert p.command == "train" and p.method == "macer" and p.sigma == sigma and p.epochs == 5 and p.threads == 1
        assert p.k == 16 and p.beta == 16 and p.gamma == 8
    assert (parsed[0].lbd, parsed[0].lbd_warmup) == (4, None)  # sigma 0.25: lbd 4 from the first epoch
    assert (parsed[1].lbd, parsed[1].lbd_warmup) == (1, 2)  # sigma 0.5: lbd 1, switched on over 2 epochs
    assert "--lbd-warmup" not in cmds[0]


def test_pacd_pair_report(tmp_path):
    """pacd_pair.py writes the JSON of engine.evaluate.pair_evaluations for each --pair, with the commands given;
    a bad pair is one error line."""
    import numpy as np

    from engine.evaluate import pair_evaluations
    from engine.results import ResultsLog

    def victim(name, radii, poisoned):
        d = tmp_path / name
        d.mkdir()
        log = ResultsLog(d / "certify.tsv", {"test": 1})
        for i, r in enumerate(radii):
            log.append(i, 8, 8, float(r), 0.1)
        (d / "summary.json").write_text(json.dumps({"acr": float(np.mean(radii)), "poisoned": poisoned, "images": 40,
                                                    "n": 1000}))
        return d

    rng = np.random.default_rng(3)
    base = rng.uniform(0.2, 2.0, 40)
    clean, bad = victim("clean", base, False), victim("bad", base * rng.uniform(0.3, 0.9, 40), True)
    out = tmp_path / "r.json"
    proc = _run("pacd_mnist/pacd_pair.py", "--pair", f"x={clean},{bad}", "--what", "toy", "--command", "cmd 1",
                "--threads-per-run", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["results"]["x"] == json.loads(json.dumps(pair_evaluations(clean, bad)))
    assert report["commands"] == ["cmd 1"] and report["threads_per_run"] == 1 and report["what"] == "toy"
    assert "| x |" in proc.stdout
    for pair, msg in ((f"x={bad},{clean}", "error: expected a clean victim"), (f"x={clean}", "LABEL=CLEAN_DIR,POISONED_DIR")):
        proc = _run("pacd_mnist/pacd_pair.py", "--pair", pair, "--what", "toy", "--out", out)
        assert proc.returncode != 0 and msg in proc.stderr and "Traceback" not in proc.stderr


def test_pacd_mnist_tiny_end_to_end_and_resume(tmp_path):
    """pacd_mnist_evidence.py on the embedded subset at toy settings: --stage clean trains only the
    clean victims and --stage transfer --archs mlp one part of the transfer matrix, which the full run then
    reuses; poisons, main table with clean and poisoned victims side
    by side, transfer matrix; a second run reuses everything."""
    script = EXPERIMENTS / "pacd_mnist" / "pacd_mnist_evidence.py"
    out = tmp_path / "pacd"
    args = [sys.executable, str(script), "--data-root", str(data.embedded_mnist_root()), "--work", str(tmp_path / "work"),
            "--out", str(out), "--methods", "gaussian,macer", "--outer-steps", "2,macer=1", "--train-size", "900", "--val-size",
            "300", "--batch-clean", "60", "--batch-poison", "20", "--batch-val", "10", "--k", "2", "--niter1", "2",
            "--niter2", "2", "--victim-epochs", "1", "--images", "3", "--n", "40", "--transfer", "--transfer-images", "2",
            "--transfer-n", "20", "--archs", "lenet,mlp", "--threads", "1", "--lower-args", '{"macer": {"k": 3}}',
            "--solver", "approxgrad,macer=cg", "--damping", "1e-3,macer=10"]  # fmt: skip
    first = subprocess.run(args + ["--stage", "clean"], capture_output=True, text=True)  # clean victims only
    assert first.returncode == 0, first.stderr[-3000:]
    assert "crafting poison" not in first.stdout and not list((tmp_path / "work").glob("poison_*"))
    clean_victims = {m: tmp_path / "work" / "main" / m / "clean" / "victim.safetensors" for m in ("gaussian", "macer")}
    stamps = {m: v.stat().st_mtime_ns for m, v in clean_victims.items()}
    assert not out.with_suffix(".json").exists() and not (tmp_path / "work" / "main" / "gaussian" / "poisoned").exists()
    # the MLP part of the transfer matrix alone, for the GA poison alone (crafts only the poison it needs),
    # in its own report
    part_out = tmp_path / "pacd_mlp"
    part_args = args[: args.index("--out") + 1] + [str(part_out)] + args[args.index("--out") + 2 :]
    bad = subprocess.run(part_args + ["--stage", "transfer", "--crafted", "smoothadv"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--crafted: ['smoothadv'] not among --methods" in bad.stderr
    part = subprocess.run(part_args + ["--stage", "transfer", "--archs", "mlp", "--crafted", "gaussian"],
                          capture_output=True, text=True)
    assert part.returncode == 0, part.stderr[-3000:]
    assert not (tmp_path / "work" / "poison_macer.safetensors").exists()
    part_report = json.loads(part_out.with_suffix(".json").read_text())
    assert part_report["main"] == {} and sorted(part_report["transfer"]) == ["gaussian->gaussian/mlp", "gaussian->macer/mlp"]
    part_md = part_out.with_suffix(".md").read_text()
    assert "(not run in this invocation: --stage transfer)" in part_md
    part_matrix = part_md.split("| poison crafted for | gaussian / mlp | macer / mlp |")[1].strip().split("\n\n")[0]
    assert [x.split(" | ")[0] for x in part_matrix.splitlines()[1:]] == ["| gaussian"]  # one row: the GA poison
    mlp_victim = tmp_path / "work" / "transfer" / "mlp" / "macer" / "gaussian" / "victim.safetensors"
    mlp_stamp = mlp_victim.stat().st_mtime_ns
    # the poisoned main-table victim of one procedure alone
    alone = subprocess.run(args + ["--stage", "poisoned", "--methods", "gaussian", "--outer-steps", "2"], capture_output=True,
                           text=True)
    assert alone.returncode == 0, alone.stderr[-3000:]
    work_main = tmp_path / "work" / "main"
    assert (work_main / "gaussian" / "poisoned" / "summary.json").exists() and not (work_main / "macer" / "poisoned").exists()
    poisoned_stamp = (work_main / "gaussian" / "poisoned" / "victim.safetensors").stat().st_mtime_ns
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {m: v.stat().st_mtime_ns for m, v in clean_victims.items()} == stamps  # the clean stage's victims reused
    assert mlp_victim.stat().st_mtime_ns == mlp_stamp  # and the transfer stage's
    assert (work_main / "gaussian" / "poisoned" / "victim.safetensors").stat().st_mtime_ns == poisoned_stamp
    # LeNet transfer victims with the main table's settings are its victims, certified again
    tr = tmp_path / "work" / "transfer" / "lenet"
    for mine, theirs in ((tr / "gaussian" / "clean", work_main / "gaussian" / "clean"),
                         (tr / "macer" / "macer", work_main / "macer" / "poisoned")):
        assert (mine / "victim.safetensors").read_bytes() == (theirs / "victim.safetensors").read_bytes()
    assert (tr / "gaussian" / "macer" / "victim.safetensors").read_bytes() != (
        work_main / "gaussian" / "poisoned" / "victim.safetensors").read_bytes()  # another poison: its own victim
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["main"]) == {"gaussian", "macer"}
    for m, r in report["main"].items():
        assert not r["clean"]["poisoned"] and r["poisoned"]["poisoned"] and r["poisoned"]["poison_method"] == m
        assert r["clean"]["images"] == 3 and r["clean"]["target_class"] == 8
    assert len(report["transfer"]) == 2 * 2 * 2  # crafted-for x victim x arch
    md = out.with_suffix(".md").read_text()
    main_rows = [x for x in md.split("## Settings")[0].splitlines() if x.startswith("| gaussian |") or x.startswith("| macer |")]
    assert len(main_rows) == 2 and all(x.count("|") == 13 for x in main_rows)  # one side-by-side line per procedure
    images, labels = data.load_mnist(data.embedded_mnist_root(), "train")  # the driver's split: --train-size, --val-size
    keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[:900].sort().values
    train, _ = data.split_validation(images[keep], labels[keep], 300)
    poisons = {m: PoisonSet.load(tmp_path / "work" / f"poison_{m}.safetensors", train) for m in ("gaussian", "macer")}
    assert all(ps.settings["quantized"]["encoding"] == "int8" for ps in poisons.values())  # stored compactly by default
    assert poisons["gaussian"].settings["outer_steps"] == 2 and poisons["macer"].settings["outer_steps"] == 1
    assert poisons["macer"].settings["method_args"] == {"k": 3, "beta": 16.0, "gamma": 8.0, "lbd": 1.0}  # --lower-args
    assert (poisons["macer"].settings["solver"], poisons["macer"].settings["damping"]) == ("cg", 10.0)  # per procedure
    assert (poisons["gaussian"].settings["solver"], poisons["gaussian"].settings["damping"]) == ("approxgrad", 1e-3)
    assert all(ps.target_class == 8 and len(ps.settings["upper_by_step"]) == ps.settings["outer_steps"]
               for ps in poisons.values())
    assert report["outer_steps"] == {"gaussian": 2, "macer": 1} and report["victim_epochs"] == {"gaussian": 1, "macer": 1}
    assert "| gaussian | 0.5 | 2 |" in md and "| macer | 0.75 | 1 |" in md  # settings table states the outer steps
    assert md.count("goal met") + md.count("goal NOT met") == 2
    assert md.split("## Settings")[0].count("95% paired bootstrap interval") == 2
    head = "| poison crafted for | gaussian / lenet | macer / lenet | gaussian / mlp | macer / mlp |"
    matrix = md.split(head)[1].strip().splitlines()[1:3]  # the rows after the separator
    assert [x.split(" | ")[0] for x in matrix] == ["| gaussian", "| macer"] and all(x.count("|") == 6 for x in matrix)
    for r in list(report["main"].values()) + list(report["transfer"].values()):
        lo, hi = r["acr_drop_interval_95"]
        assert r["acr_drop"] != r["acr_drop"] or lo <= hi  # nan when the clean ACR is 0 (toy victims)
    bad = subprocess.run(args[:2] + ["--outer-steps", "gaussian=2", "--methods", "gaussian,macer"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "--outer-steps gives no value for macer" in bad.stderr
    bad = subprocess.run(args[:2] + ["--outer-steps", "gausian=2"], capture_output=True, text=True)
    assert bad.returncode != 0 and "METHOD=N" in bad.stderr
    again = subprocess.run(args, capture_output=True, text=True)  # everything is reused
    assert again.returncode == 0, again.stderr[-3000:]
    assert "crafting poison" not in again.stdout
    keys = ("acr", "certified_accuracy", "clean_accuracy_other_classes", "train_seconds")
    for m, r in json.loads(out.with_suffix(".json").read_text())["main"].items():
        for side in ("clean", "poisoned"):
            assert {k: r[side][k] for k in keys} == {k: report["main"][m][side][k] for k in keys}  # reused, not redone
    # --init-poison: crafting warm-started from the finished GA poison (in another work folder), then reused
    first_ga = tmp_path / "work" / "poison_gaussian.safetensors"
    warm_args = args + ["--work", str(tmp_path / "work2"), "--stage", "poison", "--methods", "gaussian", "--outer-steps", "1",
                        "--init-poison", f"gaussian={first_ga}"]
    warm = subprocess.run(warm_args, capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr[-3000:]
    warm_ps = PoisonSet.load(tmp_path / "work2" / "poison_gaussian.safetensors", train)
    assert warm_ps.settings["init"]["outer_steps"] == 2 and warm_ps.settings["total_outer_steps"] == 3
    assert warm_ps.settings["init"]["sha256"] == init_record(PoisonSet.load(first_ga, train))["sha256"]
    rerun = subprocess.run(warm_args, capture_output=True, text=True)
    assert rerun.returncode == 0 and "crafting poison" not in rerun.stdout
    for option, bad_value, msg in (("--lower-args", "{eps: 1}", "not JSON"),
                                   ("--lower-args", '{"smoothadvv": {"eps": 1}}', "METHOD: {ARG: VALUE}"),
                                   ("--lower-args", '{"smoothadv": 1}', "METHOD: {ARG: VALUE}"),
                                   ("--lower-args", '{"smoothadv": {"epsilon": 1}}', "epsilon"),
                                   ("--solver", "cg,macer=newton", "one of approxgrad, cg, neumann"),
                                   ("--damping", "macer=-1,0", "--damping must not be negative")):
        bad = subprocess.run(args + [option, bad_value], capture_output=True, text=True)
        assert bad.returncode != 0 and option in bad.stderr and msg in bad.stderr, bad.stderr[-2000:]
    for bad_init, msg in ((f"macer={first_ga}", "'macer' is not among --methods"), ("gaussian", "expected METHOD=FILE"),
                          (f"gaussian={tmp_path / 'none.safetensors'}", "no such poison set")):
        bad = subprocess.run(warm_args[:-1] + [bad_init], capture_output=True, text=True)
        assert bad.returncode != 0 and "--init-poison" in bad.stderr and msg in bad.stderr, bad.stderr[-2000:]


def test_pacd_poison_geometry_report(tmp_path):
    """pacd_poison_geometry.py writes engine.geometry.report of the files (named by their stems, each with its file)
    and refuses a poison of other originals with the file named."""
    from engine import geometry
    from engine.pacd import _hash_clean

    images, labels = data.load_mnist(data.embedded_mnist_root(), "train")
    train, _ = data.split_validation(images, labels, 1000)
    idx = (train[1] == 8).nonzero().flatten()
    x0 = data.to_float(train[0][idx])
    sets = {name: PoisonSet(idx.clone(), u.to(torch.float32), train[1][idx].clone(), _hash_clean(train[0][idx], train[1][idx]),
                            0.1, 0.5, "gaussian", 8, {"total_outer_steps": 3})
            for name, u in (("up", (x0 + 0.1).clamp(0, 1)), ("down", (x0 - 0.1).clamp(0, 1)))}
    for name, ps in sets.items():
        ps.save(tmp_path / f"{name}.safetensors")
    out = tmp_path / "g.json"
    proc = _run("pacd_mnist/pacd_poison_geometry.py", tmp_path / "up.safetensors", tmp_path / "down.safetensors",
                "--val-size", "1000", "--out", out)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    want = json.loads(json.dumps(geometry.report(sets, train)))
    assert rep["poisons"]["up"] == {"file": str(tmp_path / "up.safetensors"), **want["poisons"]["up"]}
    assert rep["pairs"] == want["pairs"] and rep["val_size"] == 1000 and "pacd_poison_geometry.py" in rep["command"]
    assert "| up | gaussian | 3 |" in proc.stdout
    proc = _run("pacd_mnist/pacd_poison_geometry.py", tmp_path / "up.safetensors", "--val-size", "500")  # other images
    assert proc.returncode != 0 and "up.safetensors:" in proc.stderr and "Traceback" not in proc.stderr


def test_pacd_controls_dry_run_and_fixed_protocol(tmp_path):
    """pacd_controls.py at toy sizes for one procedure: the protocol is written first, every stage runs, the summary
    lists every protocol row (those of the procedures not run as missing) with the transfer table and the goal,
    victims of another machine kind are never paired with these, and a changed protocol is refused (an amendment
    only before any victim, and never of the crafting)."""
    work, results = tmp_path / "work", tmp_path / "results"
    base = ["--dry-run", "--work", work, "--results", results, "--quiet", "--threads", "1"]
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary")
    assert proc.returncode != 0 and "protocol.json is missing" in proc.stderr
    # an amendment before any victim: allowed for the rows, refused for the crafting
    assert _run("pacd_controls/pacd_controls.py", *base, "--stage", "protocol").returncode == 0
    stored = json.loads((results / "protocol.json").read_text())
    older = {**stored, "rows": stored["rows"][:3], "amendments": []}
    (results / "protocol.json").write_text(json.dumps(older))
    assert _run("pacd_controls/pacd_controls.py", *base, "--stage", "controls").returncode != 0
    (results / "protocol.json").write_text(json.dumps({**older, "crafting": {**older["crafting"], "seed": 1}}))
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "protocol", "--amend")
    assert proc.returncode != 0 and "changes the protocol's 'crafting'" in proc.stderr
    (results / "protocol.json").write_text(json.dumps({**older, "controls": {**older["controls"], "seed": 1}}))
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "protocol", "--amend")
    assert proc.returncode != 0 and "changes the protocol's 'controls'" in proc.stderr
    (results / "protocol.json").write_text(json.dumps({**older, "amendments": stored["amendments"]}))
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "protocol", "--amend")
    assert proc.returncode != 0 and "an amendment must be listed" in proc.stderr
    (results / "protocol.json").write_text(json.dumps(older))
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "protocol", "--amend")
    assert proc.returncode == 0, proc.stderr
    amended = json.loads((results / "protocol.json").read_text())
    assert amended["written"] == stored["written"] and "amended" in amended and amended["rows"] == stored["rows"]

    # a misspelt procedure or an eps the protocol does not craft is refused by name, before any work
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "craft", "--only", "gausian")
    assert proc.returncode != 0 and "gausian is not a procedure" in proc.stderr
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "craft", "--only", "gaussian", "--eps", "0.05")
    assert proc.returncode != 0 and "crafts no poison of eps 0.05 for gaussian (its eps: 0.1)" in proc.stderr
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "victims", "--eps", "0.1")
    assert proc.returncode != 0 and "it goes with --stage craft" in proc.stderr
    assert not (work / "poisons").exists()
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "all", "--only", "gaussian")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((results / "summary.json").read_text())
    rows = {(r["arch"], r["victim"], r["poison"]): r for r in summary["rows"]}
    assert len(rows) == len(summary["protocol"]["rows"]) == 42  # 21 main rows, 21 of the transfer table
    crafted = rows[("lenet", "gaussian", "gaussian-eps0.1-crafted")]
    for key in ("acr_clean", "acr_poisoned", "acr_drop", "acr_drop_ci95", "drop_minus_twin", "drop_minus_twin_ci95",
                "smoothed_acc", "radius_given_correct", "clean_acc_target", "clean_acc_other", "images", "n", "seeds",
                "outer_steps", "eps", "kind"):
        assert key in crafted, key
    assert crafted["kind"] == "crafted" and crafted["seeds"] == [0] and crafted["outer_steps"] == 2
    assert crafted["drop_minus_twin"] is not None and crafted["same_machine_kind"]
    assert rows[("lenet", "gaussian", "gaussian-eps0.1-vertex")]["kind"] == "control"
    assert rows[("lenet", "macer", "macer-eps0.1-crafted")]["missing_seeds"] == [0]
    # the controls other than the twin do not wait for their crafted poison
    assert (work / "poisons" / "macer-eps0.1-vertex.safetensors").exists()
    assert not (work / "poisons" / "macer-eps0.1-twin.safetensors").exists()
    mlp = rows[("mlp", "gaussian", "gaussian-eps0.1-crafted")]
    assert mlp["table"] == "transfer" and mlp["seeds"] == [0] and mlp["acr_drop"] is not None
    assert rows[("lenet", "gaussian", "macer-eps0.1-crafted")]["missing_seeds"] == [0]
    (machine,) = summary["goal"]
    assert summary["goal"][machine]["gaussian-eps0.1"]["met"] in (True, False)
    assert summary["goal"][machine]["macer-eps0.1"]["met"] is None
    text = (results / "results.md").read_text()
    assert "### Transfer" in text and "| crafted for gaussian |" in text
    assert (results / "drop_vs_accuracy.png").exists()
    # the finished crafted poison and victims are kept in the results folder (tracked); a new checkout (no work
    # folder) takes them back, makes the controls again from their seed, and summarises to the same rows
    kept = results / "kept"
    assert lzma.decompress((kept / "poisons" / "gaussian-eps0.1-crafted.safetensors.xz").read_bytes()) == \
        (work / "poisons" / "gaussian-eps0.1-crafted.safetensors").read_bytes()  # kept LZMA-compressed
    assert (kept / "poisons" / "gaussian-eps0.1-crafted.safetensors.runs.jsonl").exists()
    assert sorted(p.name for p in (kept / "poisons").iterdir()) == ["gaussian-eps0.1-crafted.safetensors.runs.jsonl",
                                                                  "gaussian-eps0.1-crafted.safetensors.xz"]
    assert len(list((kept / "victims").rglob("summary.json"))) == len(list((kept / "victims").rglob("certify.tsv"))) == 10
    shutil.move(work, tmp_path / "old-work")
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary")
    assert proc.returncode != 0 and "run --stage controls" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "controls")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (work / "victims" / machine / "lenet" / "gaussian" / "clean" / "seed0").iterdir()) \
        == ["certify.json", "certify.tsv", "summary.json"]
    assert _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary").returncode == 0
    assert json.loads((results / "summary.json").read_text())["rows"] == summary["rows"]
    # a victim folder in the work folder (here one without its summary: under way) is never overwritten
    under_way = work / "victims" / machine / "lenet" / "gaussian" / "clean" / "seed0"
    (under_way / "summary.json").unlink()
    assert _run("pacd_controls/pacd_controls.py", *base, "--stage", "status").returncode == 0
    assert not (under_way / "summary.json").exists()
    shutil.copyfile(kept / under_way.relative_to(work) / "summary.json", under_way / "summary.json")
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "status")
    assert proc.returncode == 0, proc.stderr
    assert "craft gaussian-eps0.1-crafted: done of 2" in proc.stdout
    assert "craft macer-eps0.1-crafted: not started of 2" in proc.stdout
    assert f"victims of {machine}: 10 of 42 finished" in proc.stdout
    # with an estimate (here 1 s per epoch and per certified image: 3 epochs + 4 images = 7 s a victim), the status
    # also compares the finished victims' measured seconds with the estimate's
    kinds = {k: 1.0 for k in ("outer_step", "victim_epoch", "victim_epoch_mlp")}
    estimate = {"seconds": {**{p: kinds for p in ("gaussian", "macer", "smoothadv")}, "certify_image": 1.0,
                            "certify_image_mlp": 1.0}}
    (results / "estimate.json").write_text(json.dumps(estimate))
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "status")
    assert proc.returncode == 0, proc.stderr
    files = [work / "victims" / machine / r["arch"] / r["victim"] / r["poison"] / f"seed{s}" / "summary.json"
             for r in summary["protocol"]["rows"] for s in r["seeds"]]  # the protocol's victims (no set-aside ones)
    done = [json.loads(f.read_text()) for f in files if f.exists()]
    took = sum(v["train_seconds"] + v["certify_seconds"] for v in done)
    assert len(done) == 10
    assert f"with timings took {took / 3600:.2f} hours of one-thread wall time, {took / 70:.2f} times the estimate's " \
           f"{70 / 3600:.2f}" in proc.stdout
    assert f"the victims left at that ratio: {32 * 7 / 3600 * took / 70:.1f} hours" in proc.stdout
    (results / "estimate.json").unlink()
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "inspect")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((results / "poison_stats.json").read_text())["poisons"]
    assert stats["gaussian-eps0.1-vertex"]["mean_on_background"] == 1.0  # every black pixel moves up by eps
    assert stats["gaussian-eps0.1-vertex"]["at_edge"] == 1.0 and stats["gaussian-eps0.1-uniform"]["at_edge"] < 0.1
    assert 0 < stats["gaussian-eps0.1-crafted"]["mean_abs"] <= 1 + 1e-6
    # a poison another process crafts is skipped (the next one is crafted), not an error
    with ExclusiveLock(work / "poisons" / "macer-eps0.1-crafted.safetensors.ckpt"):
        proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "craft", "--only", "macer")
    assert proc.returncode == 0, proc.stderr
    assert "macer-eps0.1-crafted.safetensors: skipped" in proc.stdout and "another process" in proc.stdout
    assert not (work / "poisons" / "macer-eps0.1-crafted.safetensors").exists()
    # every crafting run is recorded beside the poison and in its settings (processes, threads, machine kind)
    (run,) = _poison_settings(work / "poisons" / "gaussian-eps0.1-crafted.safetensors")["crafting_runs"]
    assert run["from_step"] == 0 and run["world_size"] == 1 and run["threads_per_process"] == 1
    assert run["machine"] == machine
    # under torchrun the ranks craft each poison together (data-parallel); a held poison is still skipped by all
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with ExclusiveLock(work / "poisons" / "macer-eps0.1-crafted.safetensors.ckpt"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               str(EXPERIMENTS / "pacd_controls/pacd_controls.py"), *map(str, base), "--stage", "craft",
                               "--only", "macer,smoothadv"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("macer-eps0.1-crafted.safetensors: skipped") == 1  # rank 0 speaks for both
    assert "smoothadv-eps0.1-crafted.safetensors (2 outer steps, 2 processes)" in proc.stdout
    (run,) = _poison_settings(work / "poisons" / "smoothadv-eps0.1-crafted.safetensors")["crafting_runs"]
    assert run["from_step"] == 0 and run["world_size"] == 2
    assert not (work / "poisons" / "macer-eps0.1-crafted.safetensors").exists()
    # the other stages run in one process
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / "pacd_controls/pacd_controls.py"), *map(str, base),
                           "--stage", "victims"], capture_output=True, text=True, env={**env, "WORLD_SIZE": "2"})
    assert proc.returncode != 0 and "only --stage craft runs under torchrun" in proc.stderr

    # the victims' machine kind includes the thread count: the victims stage does not guess it
    proc = _run("pacd_controls/pacd_controls.py", *base[:-2], "--stage", "victims")
    assert proc.returncode != 0 and "--stage victims needs --threads" in proc.stderr
    # a crafted poison made again: its victims' results and its twin are stale; the summary refuses them, the victims
    # stage sets them aside (nothing deleted), makes the twin again and trains their victims again
    images, labels = data.load_mnist(data.embedded_mnist_root(), "train")
    train, _ = data.split_validation(images, labels, 100)
    crafted_file = work / "poisons" / "gaussian-eps0.1-crafted.safetensors"
    ps = PoisonSet.load(crafted_file, (train[0][:1000], train[1][:1000]))
    ps.settings["remade"] = True
    ps.save(crafted_file)
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary")  # the kept copy is not replaced
    assert proc.returncode != 0 and "differs from the kept poison" in proc.stderr
    (kept / "poisons" / f"{crafted_file.name}.xz").unlink()
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary")
    assert proc.returncode != 0 and "its results are not those of this row now" in proc.stderr
    assert lzma.decompress((kept / "poisons" / f"{crafted_file.name}.xz").read_bytes()) == crafted_file.read_bytes()
    held = work / "victims" / machine / "mlp" / "gaussian" / "gaussian-eps0.1-crafted" / "seed0"
    with ExclusiveLock(held):  # a victim another process has (its folder's lock) is left to it
        proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "victims", "--only", "gaussian")
    assert proc.returncode == 0, proc.stderr
    assert "gaussian-eps0.1-twin.safetensors: it is the twin of poison" in proc.stdout and "made again" in proc.stdout
    assert "mlp / gaussian / gaussian-eps0.1-crafted / seed 0: skipped, another process has it" in proc.stdout
    assert proc.stdout.count("its results are not this row's") == 2  # crafted and twin (LeNet)
    again = work / "victims" / machine / "lenet" / "gaussian" / "gaussian-eps0.1-crafted" / "seed0"
    for name in ("summary.json", "certify.tsv"):  # copied to the kept results as soon as it is trained again
        assert (kept / again.relative_to(work) / name).read_bytes() == (again / name).read_bytes()
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "victims", "--only", "gaussian")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("its results are not this row's") == 1  # crafted (MLP), once released
    twin_like = _poison_settings(work / "poisons" / "gaussian-eps0.1-twin.safetensors")["like"]["sha256"]
    assert twin_like == init_record(ps)["sha256"]
    assert len(list((work / "poisons").glob("gaussian-eps0.1-twin.safetensors.stale-*"))) == 1
    assert len(list((work / "victims").glob(f"{machine}/*/gaussian/gaussian-eps0.1-*/seed0.stale-*"))) == 3
    assert _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary").returncode == 0

    # a victim of another CPU kind is reported in its own section, never paired with this kind's clean victims
    src = next((work / "victims").glob("*/lenet/gaussian/gaussian-eps0.1-crafted/seed0"))
    dst = work / "victims" / "other-cpu-t1" / "lenet" / "gaussian" / "gaussian-eps0.1-crafted" / "seed0"
    shutil.copytree(src, dst)
    assert _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary").returncode == 0
    summary = json.loads((results / "summary.json").read_text())
    assert sorted(summary["goal"]) == sorted([machine, "other-cpu-t1"])
    other = {(r["arch"], r["victim"], r["poison"]): r for r in summary["rows"] if r["machine"] == "other-cpu-t1"}
    assert other[("lenet", "gaussian", "gaussian-eps0.1-crafted")]["seeds"] == [0]
    assert other[("lenet", "gaussian", "gaussian-eps0.1-crafted")]["acr_drop"] is None  # no clean victim there
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "protocol", "--amend")
    assert proc.returncode != 0 and "can no longer be amended" in proc.stderr

    protocol = json.loads((results / "protocol.json").read_text())
    protocol["certification"]["n"] = 7  # the protocol is fixed: a driver with other settings refuses to run
    (results / "protocol.json").write_text(json.dumps(protocol))
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary")
    assert proc.returncode != 0 and "differs from this driver's protocol" in proc.stderr


def _poison_settings(path):
    """The settings a poison file records (read from its header: an int8 file needs no training set for that)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return json.loads(fh.metadata()["engine_poison"])["meta"]["settings"]


def _fake_victim(folder, radius, acc_target):
    """A finished victim's files as evaluate_poison writes them, for the protocol in ``results``: every image of class 8
    certified with ``radius``; its settings, certification and poison (the file in ``work/poisons`` now) those of the
    row its folder names (.../<arch>/<victim>/<poison>/seed<s>)."""
    from engine.pacd import read_poison_header

    work = folder.parents[5]
    protocol = json.loads((work.parent / "results" / "protocol.json").read_text())
    arch, victim, poison, seed = folder.parts[-4], folder.parts[-3], folder.parts[-2], int(folder.name[4:])
    v, c = protocol["victims"], protocol["certification"]
    identity = None if poison == "clean" else read_poison_header(work / "poisons" / f"{poison}.safetensors")["sha256"]
    train_settings = {"arch": arch, "victim_method": victim, "sigma": float(v["sigma"][victim]),
                      "epochs": v["epochs"][victim], "batch_size": v["batch_size"], "lr": float(v["lr"]),
                      "optimizer": v["optimizer"], "schedule": v["schedule"], "seed": seed,
                      "method_args": v["method_args"][victim], "train_size": 1000,
                      "poison_sha256": None if identity is None else "meta-digest", "poison_method": None}
    folder.mkdir(parents=True)
    images = c["images"]
    settings = {"victim": "fake", "target_class": 8, "sigma": float(v["sigma"][victim]), "n0": c["n0"], "n": c["n"],
                "alpha": c["alpha"], "images": images, "certify_seed": 0}
    (folder / "certify.json").write_text(json.dumps({"settings": settings}))
    rows = "".join(f"{i}\t8\t8\t{radius:.6f}\t1\t0.0100\n" for i in range(images))
    (folder / "certify.tsv").write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n" + rows)
    (folder / "summary.json").write_text(json.dumps({
        "acr": radius, "certified_accuracy": {"0": 1.0}, "clean_accuracy_target": acc_target,
        "clean_accuracy_other_classes": 0.95, "images": images, "n0": c["n0"], "n": c["n"], "alpha": c["alpha"],
        "train_settings": train_settings,
        "trace": {"cpu": "test cpu", "threads": 1, "poison_content_sha256": identity}}))


def _fake_poisons(work, names, seed=0):
    """Poison files named like the protocol's (a crafted one, its twin, controls) on a small random training set: the
    summary reads their headers (identity, the twin's crafted poison, outer steps), never their images."""
    from engine.pacd import random_poison

    g = torch.Generator().manual_seed(seed)
    train = (torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=g), torch.arange(40) % 10)
    (work / "poisons").mkdir(parents=True, exist_ok=True)
    for name in names:
        eps = float(name.split("-eps")[1].split("-")[0])
        kind = name.rsplit("-", 1)[1]
        crafted = None
        if kind == "twin":
            crafted = PoisonSet.load(work / "poisons" / name.replace("-twin", "-crafted.safetensors"), train)
        ps = random_poison(train, target_class=8, eps=eps, kind="uniform" if kind in ("crafted", "twin") and
                           crafted is None else kind, seed=seed, like=crafted)
        if kind == "crafted":
            ps.settings["outer_steps"] = 7
        ps.save(work / "poisons" / f"{name}.safetensors")


def test_pacd_controls_goal_verdicts_on_known_victims(tmp_path):
    """The summary's goal check on victims of known radii under the real protocol: met where the crafted poison
    beats its twin by 40 points and every control no costlier; undecided while a seed is missing; failed where a
    cheaper control does more, and where the crafted poison raises the ACR at low eps (twice a negative vertex drop
    is no goal met). The transfer table shows the seed-0 drop of its cell."""
    work, results = tmp_path / "work", tmp_path / "results"
    base = ["--work", work, "--results", results, "--quiet", "--data-root", tmp_path / "unused"]
    assert _run("pacd_controls/pacd_controls.py", *base, "--stage", "protocol").returncode == 0
    root = work / "victims" / "test-cpu-t1"
    _fake_poisons(work, ["gaussian-eps0.1-crafted", "gaussian-eps0.1-twin", "gaussian-eps0.1-vertex",
                         "gaussian-eps0.1-sign", "gaussian-eps0.1-uniform", "gaussian-eps0.1-shift",
                         "gaussian-eps0.03-crafted", "gaussian-eps0.03-vertex", "gaussian-eps0.05-crafted",
                         "gaussian-eps0.05-vertex"])
    # (poison, radius, accuracy on class 8) of the Gaussian-augmentation victims; the clean ones: radius 1, 0.90
    ga = [("clean", 1.0, 0.90), ("gaussian-eps0.1-crafted", 0.5, 0.86), ("gaussian-eps0.1-twin", 0.9, 0.88),
          ("gaussian-eps0.1-vertex", 0.3, 0.60), ("gaussian-eps0.1-sign", 0.95, 0.90),
          ("gaussian-eps0.1-uniform", 0.95, 0.89), ("gaussian-eps0.1-shift", 0.7, 0.87),
          ("gaussian-eps0.03-crafted", 1.03, 0.90), ("gaussian-eps0.03-vertex", 1.02, 0.90),
          ("gaussian-eps0.05-crafted", 0.8, 0.89), ("gaussian-eps0.05-vertex", 0.95, 0.90)]
    seeds3 = ("clean", "crafted", "twin", "vertex")
    for poison, radius, acc in ga:
        for seed in (0, 1, 2) if poison.endswith(seeds3) else (0,):
            _fake_victim(root / "lenet" / "gaussian" / poison / f"seed{seed}", radius, acc)
    _fake_victim(root / "mlp" / "gaussian" / "clean" / "seed0", 0.8, 0.9)
    _fake_victim(root / "mlp" / "gaussian" / "gaussian-eps0.1-crafted" / "seed0", 0.6, 0.9)

    def summary():
        proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary")
        assert proc.returncode == 0, proc.stderr
        return json.loads((results / "summary.json").read_text())["goal"]["test-cpu-t1"]

    goal = summary()
    v = goal["gaussian-eps0.1"]
    assert v["complete"] and v["twin_goal"] and v["frontier_goal"] and v["met"]
    assert abs(v["drop"] - 0.5) < 1e-6 and abs(v["drop_minus_twin"] - 0.4) < 1e-6 and abs(v["cost"] - 0.04) < 1e-6
    assert sorted(v["controls_no_costlier"]) == ["shift", "sign", "twin", "uniform"]  # not the vertex (cost 0.30)
    assert goal["gaussian-eps0.03"]["met"] is False  # the crafted poison raises the ACR (so does the vertex)
    assert goal["gaussian-eps0.05"]["met"] is True  # 20% >= 2 x 5%
    assert goal["macer-eps0.1"]["met"] is None and not goal["macer-eps0.1"]["complete"]
    text = (results / "results.md").read_text()
    assert "| crafted for gaussian | 50.0% | - | - | 25.0% | - | - |" in text
    gone = root / "lenet" / "gaussian" / "gaussian-eps0.1-vertex" / "seed2"
    shutil.rmtree(gone)  # a victim dropped from the work folder and from results/kept (else the kept one comes back)
    shutil.rmtree(results / "kept" / gone.relative_to(work))
    v = summary()["gaussian-eps0.1"]
    assert not v["complete"] and v["met"] is None and v["frontier_goal"] is None
    _fake_victim(root / "lenet" / "gaussian" / "gaussian-eps0.1-vertex" / "seed2", 0.3, 0.60)
    shutil.rmtree(root / "lenet" / "gaussian" / "gaussian-eps0.1-shift" / "seed0")
    _fake_victim(root / "lenet" / "gaussian" / "gaussian-eps0.1-shift" / "seed0", 0.45, 0.87)  # cheaper, 55% drop
    v = summary()["gaussian-eps0.1"]
    assert v["complete"] and v["twin_goal"] and v["frontier_goal"] is False and v["met"] is False
    rows = json.loads((results / "summary.json").read_text())["rows"]
    assert {r["outer_steps"] for r in rows if r["poison"] == "gaussian-eps0.1-crafted"} == {7}  # from the file

    # results of another poison are never summarised: a control file made again (another seed) ...
    _fake_poisons(work, ["gaussian-eps0.03-vertex"], seed=1)
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary")
    assert proc.returncode != 0 and "gaussian-eps0.03-vertex/seed0: its results are not those of this row" in proc.stderr
    assert "(poison " in proc.stderr
    _fake_poisons(work, ["gaussian-eps0.03-vertex"], seed=0)
    assert _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary").returncode == 0
    # ... nor a twin of an earlier crafted poison, nor a victim of other settings
    def refake(poison, radius, acc, seeds=(0, 1, 2), arch="lenet"):
        for seed in seeds:
            shutil.rmtree(root / arch / "gaussian" / poison / f"seed{seed}")
            _fake_victim(root / arch / "gaussian" / poison / f"seed{seed}", radius, acc)

    _fake_poisons(work, ["gaussian-eps0.1-crafted"], seed=1)
    (results / "kept" / "poisons" / "gaussian-eps0.1-crafted.safetensors.xz").unlink()  # the kept copy goes too
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary")
    assert proc.returncode != 0 and "gaussian-eps0.1-crafted/seed0: its results are not those" in proc.stderr
    refake("gaussian-eps0.1-crafted", 0.5, 0.86)
    refake("gaussian-eps0.1-crafted", 0.6, 0.9, seeds=(0,), arch="mlp")
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary")
    assert proc.returncode != 0 and "gaussian-eps0.1-twin.safetensors: it is the twin of poison" in proc.stderr
    _fake_poisons(work, ["gaussian-eps0.1-twin"], seed=1)  # the twin of the crafted poison there now
    assert _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary").returncode != 0  # its old victims
    refake("gaussian-eps0.1-twin", 0.9, 0.88)
    assert _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary").returncode == 0
    victim = root / "lenet" / "gaussian" / "gaussian-eps0.1-crafted" / "seed1"
    stored = json.loads((victim / "summary.json").read_text())
    stored["train_settings"]["epochs"] = 3
    (victim / "summary.json").write_text(json.dumps(stored))
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "summary")
    assert proc.returncode != 0 and "epochs 3 (protocol 10)" in proc.stderr
    stored["train_settings"]["epochs"] = 10
    (victim / "summary.json").write_text(json.dumps(stored))
    # clean victims that certify nothing: no drop is defined, no verdict given (and no crash)
    refake("clean", 0.0, 0.90)
    goal = summary()
    assert goal["gaussian-eps0.1"]["met"] is None and "no ACR drop is defined" in goal["gaussian-eps0.1"]["undefined"]
    assert goal["gaussian-eps0.03"]["met"] is None and "no ACR drop is defined" in goal["gaussian-eps0.03"]["undefined"]


def test_lower_subset_dry_run_crafts_on_the_subset_and_reports_every_row(tmp_path):
    """lower_subset.py at toy sizes: the subset poison records its lower_subset and covers every image of the class;
    one victim of the protocol's share 0/6 runs; the summary lists every protocol row (the others as missing)."""
    work, results = tmp_path / "work", tmp_path / "results"
    base = ["--dry-run", "--work", work, "--results", results, "--quiet", "--threads", "1"]
    assert _run("lower_subset/lower_subset.py", *base, "--stage", "protocol").returncode == 0
    proc = _run("lower_subset/lower_subset.py", *base, "--stage", "craft", "--only", "subset")
    assert proc.returncode == 0, proc.stderr
    train = data.split_validation(*data.load_mnist(data.embedded_mnist_root(), "train"), 100)[0]
    ps = PoisonSet.load(work / "poisons" / "subset-crafted.safetensors", train)
    assert ps.settings["lower_subset"] == 50 and len(ps) == int((train[1] == 8).sum())
    assert ps.settings["reset_every"] == 0  # neither poison restarts its lower model (the subset's epochs are shorter)
    assert sorted(p.name for p in (work / "poisons").glob("*.safetensors")) == ["subset-crafted.safetensors",
                                                                                "subset-twin.safetensors"]
    proc = _run("lower_subset/lower_subset.py", *base, "--stage", "victims", "--part", "0/6")
    assert proc.returncode == 0, proc.stderr
    proc = _run("lower_subset/lower_subset.py", *base, "--stage", "summary")
    assert proc.returncode == 0, proc.stderr
    rows = {r["poison"]: r for r in json.loads((results / "summary.json").read_text())["rows"]}
    assert list(rows) == ["clean", "full-crafted", "subset-crafted", "full-twin", "subset-twin", "vertex"]
    assert rows["clean"]["seeds"] == [0] and len(rows["clean"]["acr"]) == 1
    assert all(rows[k]["missing_seeds"] == [0] and rows[k]["acr_drop"] is None for k in list(rows)[1:])
    assert "| subset-crafted | 0 |" in (results / "results.md").read_text()


def test_crafting_modes_refuses_before_writing(tmp_path):
    """crafting_modes.py checks every block of --schedule and its --out before it writes anything: a bad block or
    the file of an earlier run (its blocks would be lost) is refused, nothing written, no crafting started."""
    out = tmp_path / "modes.json"
    proc = _run("pacd_controls/crafting_modes.py", "--schedule", "dp:gaussian,pair:gaussian", "--out", out,
                "--work", tmp_path / "work")
    assert proc.returncode != 0 and "'pair:gaussian' is not pair:A+B or dp:A" in proc.stderr
    assert not out.exists() and not (tmp_path / "work").exists()
    out.write_text("{}")
    proc = _run("pacd_controls/crafting_modes.py", "--schedule", "dp:gaussian", "--out", out, "--work", tmp_path / "work")
    assert proc.returncode != 0 and "exists (the blocks of an earlier run)" in proc.stderr
    assert out.read_text() == "{}" and not (tmp_path / "work").exists()


def test_run_both_cores_order_and_lock(tmp_path):
    """run_both_cores.sh with a stand-in Python that logs its calls: the poisons are crafted one after the other, each
    under torchrun on two ranks (MACER, SmoothAdv, GA eps 0.1, 0.03, 0.05), then the controls; only then two
    processes pass over the victims (MACER, GA, SmoothAdv rows) and one of them once more; every call names the work
    folder and one thread; a second copy is refused while the first runs; a failed step does not stop the later
    ones, and the script's exit status says that one failed."""
    work, calls = tmp_path / "work", tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    f'echo "start $(date +%s.%N) $PPID $*" >> {calls}\n'
                    'echo "$PPID $*"\n'
                    'case "$*" in *"--stage craft"*) sleep 1;; *"--stage victims"*) sleep 0.2;; esac\n'
                    f'echo "end $(date +%s.%N) $PPID $*" >> {calls}\n'
                    'case "$*" in *"--only smoothadv --eps"*) [ -n "$FAIL_SMOOTHADV" ] && exit 3;; esac\n'
                    'exit 0\n')
    fake.chmod(0o755)
    script = EXPERIMENTS / "pacd_controls" / "run_both_cores.sh"
    env = {**os.environ, "WORK": str(work), "PYTHON": str(fake)}
    first = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (calls.exists() and "--stage craft" in calls.read_text()):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        second = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
        assert second.returncode == 1 and "run_both_cores.sh already runs" in second.stderr
        assert first.wait(timeout=60) == 0
    finally:
        if first.poll() is None:  # the script, its subshells and their calls
            os.killpg(first.pid, signal.SIGKILL)
    craft_log, = work.glob("craft-*.log")
    victims_logs = sorted(work.glob("victims-*.log"))
    assert [p.name.split("-")[1] for p in victims_logs] == ["a", "b"]
    head = f"bench/experiments/pacd_controls/pacd_controls.py --data-root ../shared/data/mnist --work {work} --threads 1"
    dp = "-m torch.distributed.run --standalone --nproc-per-node=2 "
    crafted = craft_log.read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in crafted] == [
        *(f"{dp}{head} --stage craft --only {proc} --eps {eps}"
          for proc, eps in (("macer", 0.1), ("smoothadv", 0.1), ("gaussian", 0.1), ("gaussian", 0.03),
                            ("gaussian", 0.05))),
        f"{head} --stage controls"]
    stages = [f"{head} --stage victims --only {proc}" for proc in ("macer", "gaussian", "smoothadv")]
    passes = [p.read_text().splitlines() for p in victims_logs]
    assert [[line.split(" ", 1)[1] for line in lines] for lines in passes] == [stages * 2, stages]
    # two victims processes (the parent pid of each call), both started after the crafting and controls ended; the
    # last pass after both ended
    pids = [{line.split()[0] for line in lines[:3]} for lines in passes]
    assert all(len(p) == 1 for p in pids) and pids[0] != pids[1]
    records = [line.split(" ", 3) for line in calls.read_text().splitlines()]
    crafting_end = max(float(t) for kind, t, pid, args in records if kind == "end" and "--stage victims" not in args)
    victims_start = min(float(t) for kind, t, pid, args in records if kind == "start" and "--stage victims" in args)
    assert victims_start > crafting_end
    two_end = max(float(t) for kind, t, pid, args in records if kind == "end" and {pid} in pids)
    last = [float(t) for kind, t, pid, args in records if kind == "start" and "--stage victims" in args
            and {pid} not in pids]
    assert len(last) == 3 and min(last) > two_end
    # a failed step (SmoothAdv's crafting): the later steps run all the same, and the exit status is 1
    shutil.rmtree(work)
    calls.unlink()
    failed = subprocess.run(["bash", str(script)], env={**env, "FAIL_SMOOTHADV": "1"}, capture_output=True, text=True,
                            timeout=60)
    assert failed.returncode == 1
    assert len(calls.read_text().splitlines()) == len(records)


def test_pacd_controls_keeps_an_unfinished_crafting_checkpoint_compactly(tmp_path):
    """A poison still crafting when a new checkout comes is not lost: every stage's sync keeps its checkpoint's compact
    copy (with the runs record) in the tracked results once the checkpoint is ahead of it, a work folder without the
    checkpoint gets it back expanded (recorded as such), crafting resumes from it, and the finished poison replaces
    the compact copy."""
    work, results = tmp_path / "work", tmp_path / "results"
    base = ["--dry-run", "--work", work, "--results", results, "--quiet", "--threads", "1"]
    assert _run("pacd_controls/pacd_controls.py", *base, "--stage", "protocol").returncode == 0
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "craft", "--only", "gaussian")
    assert proc.returncode == 0, proc.stderr
    poisons, kept = work / "poisons", results / "kept" / "poisons"
    name = "gaussian-eps0.1-crafted.safetensors"
    ckpt, compact = poisons / f"{name}.ckpt", kept / f"{name}.ckpt.xz"
    assert ckpt.exists() and (kept / f"{name}.xz").exists() and not compact.exists()  # finished: the poison is kept
    finished = (poisons / name).read_bytes()
    # a poison still crafting: its checkpoint (here at the last step) and no poison file
    (poisons / name).unlink()
    (kept / f"{name}.xz").unlink()
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "status")
    assert proc.returncode == 0, proc.stderr
    assert f"kept in {results / 'kept'}: 1 ({name}.ckpt.xz (step 2," in proc.stdout
    assert "craft gaussian-eps0.1-crafted: checkpoint at step 2 (kept compact copy at step 2) of 2" in proc.stdout
    assert compact.stat().st_size < ckpt.stat().st_size
    assert (kept / f"{name}.runs.jsonl").read_bytes() == (poisons / f"{name}.runs.jsonl").read_bytes()
    mtime = compact.stat().st_mtime_ns
    assert _run("pacd_controls/pacd_controls.py", *base, "--stage", "status").returncode == 0
    assert compact.stat().st_mtime_ns == mtime  # not ahead of its kept copy: not written again
    from safetensors.torch import save

    from engine.pacd import COMPACT_KEY, read_compact_checkpoint

    def claim(step):  # the kept copy as if made at another step
        tensors, info = read_compact_checkpoint(compact)
        info["checkpoint"]["step"] = step
        compact.write_bytes(lzma.compress(save(tensors, metadata={COMPACT_KEY: json.dumps(info)})))

    claim(3)  # a kept copy ahead of the work folder's checkpoint stays, and the sync says so
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "status")
    assert proc.returncode == 0, proc.stderr
    assert f"{name}.ckpt: at step 2, behind its kept compact copy (step 3); the kept copy stays" in proc.stdout
    assert read_compact_checkpoint(compact)[1]["checkpoint"]["step"] == 3
    for older in (lambda: claim(1), lambda: compact.write_bytes(b"not lzma")):  # behind, or unreadable: replaced
        older()
        proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "status")
        assert proc.returncode == 0, proc.stderr
        assert f"kept in {results / 'kept'}: 1 ({name}.ckpt.xz (step 2," in proc.stdout
        assert read_compact_checkpoint(compact)[1]["checkpoint"]["step"] == 2
    assert "unreadable" in proc.stdout and not list(kept.glob("*.tmp")) and not list(kept.glob("*.lock"))
    # a new checkout: no work folder; the checkpoint comes back expanded, and the run record says so (a record left
    # in a work folder without the checkpoint is another line of runs: set aside, not mixed in)
    shutil.rmtree(work)
    poisons.mkdir(parents=True)
    (poisons / f"{name}.runs.jsonl").write_text('{"from_step": 0, "note": "another line of runs"}\n')
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "status")
    assert proc.returncode == 0, proc.stderr
    assert f"restored from {results / 'kept'}: 1 ({name}.ckpt (step 2, from its compact copy))" in proc.stdout
    assert ckpt.exists() and not (poisons / name).exists()
    runs = [json.loads(line) for line in (poisons / f"{name}.runs.jsonl").read_text().splitlines()]
    assert runs[0]["from_step"] == 0 and runs[-1]["expanded"] and runs[-1]["from_step"] == 2
    assert [json.loads(line) for line in (kept / f"{name}.runs.jsonl").read_text().splitlines()] == runs[:-1]
    (aside,) = poisons.glob(f"{name}.runs.jsonl.stale-*")
    assert "another line of runs" in aside.read_text()
    # crafting goes on from it (here: already at its last step, so the poison is written from it)
    proc = _run("pacd_controls/pacd_controls.py", *base, "--stage", "craft", "--only", "gaussian")
    assert proc.returncode == 0, proc.stderr
    assert (kept / f"{name}.xz").exists() and not compact.exists()
    from safetensors.torch import load

    before, after = load(finished), load((poisons / name).read_bytes())
    assert torch.equal(before["codes"], after["codes"])  # the codes of the poison are its codes again
    assert _poison_settings(poisons / name)["crafting_runs"][-2]["expanded"]
