"""Smoke runs of the experiment drivers under bench/experiments/ at toy settings.

The product's tests never import experiment code: each driver runs here as a separate process, the way a user runs
it, so that a change to the engine that breaks an experiment shows up.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from engine import data
from engine.cli import build_parser

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
