"""Command line end to end on tiny settings, including resume after a killed run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kernel_testing import assert_no_near_ties

from engine import cli, data, models, noise
from engine.results import HEADER, ResultsError, ResultsLog


def _run(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env, **kw)


def _run_here(args, capsys):
    """cli.main in this process (no interpreter start-up): returncode, stdout and stderr as _run gives them."""
    capsys.readouterr()
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = models.lenet_mnist()
    with torch.no_grad():
        model[-1].weight.mul_(20)
    path = tmp_path_factory.mktemp("ckpt") / "lenet.safetensors"
    models.save(model, path, note="random weights for CLI tests")
    return path


def _no_near_ties(checkpoint, n, seed=0):
    """The images _certify_args selects (every 10th of the first 100, ids = their indices, sigma 0.5) have no
    near-tie among their noisy rows: runs that pack samples into other batches (shards, --batch) must then give the
    same counts on any CPU, although MKL / oneDNN sum in orders that depend on the batch shape."""
    images, _ = data.load_mnist(data.embedded_mnist_root(), "test")
    ids = torch.arange(0, 100, 10)
    streams = {noise.STREAM_SELECTION: 10, noise.STREAM_ESTIMATION: n}
    assert_no_near_ties(models.load(checkpoint), data.to_float(images[ids]), ids, streams, seed=seed, sigma=0.5)


def _rows(path):
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER
    return lines[1:]


def _certify_args(checkpoint, out, n=200, extra=()):
    return [
        "certify",
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        "mnist",
        "--sigma",
        "0.5",
        "--n0",
        "10",
        "--n",
        str(n),
        "--skip",
        "10",
        "--max",
        "100",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def test_certify_end_to_end(tmp_path, checkpoint):
    out = tmp_path / "res" / "results.tsv"
    proc = _run(_certify_args(checkpoint, out))
    assert proc.returncode == 0, proc.stderr
    rows = _rows(out)
    assert [int(r.split("\t")[0]) for r in rows] == list(range(0, 100, 10))
    for r in rows:
        idx, label, pred, radius, correct, secs = r.split("\t")
        assert int(correct) == int(int(pred) == int(label)) and float(radius) >= 0 and float(secs) > 0
    summary = json.loads((tmp_path / "res" / "results.json").read_text())
    assert summary["images"] == 10 and set(summary["certified_accuracy"]) == {f"{0.25 * i:g}" for i in range(9)}
    for key in ("acr", "clean_accuracy", "abstain_rate"):
        assert 0 <= summary[key] <= 2
    assert (tmp_path / "res" / "results.png").stat().st_size > 1000
    assert "ACR" in proc.stdout


def test_resume_after_kill_and_truncated_line(tmp_path, checkpoint):
    seed = ("--seed", "10")  # a noise seed whose 30,100 noisy rows have no near-tie (seed 0 has one)
    _no_near_ties(checkpoint, 3000, seed=10)
    # reference: an uninterrupted run
    ref = tmp_path / "ref.tsv"
    assert _run(_certify_args(checkpoint, ref, n=3000, extra=seed)).returncode == 0
    ref_rows = _rows(ref)

    out = tmp_path / "run.tsv"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", *_certify_args(checkpoint, out, n=3000, extra=seed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= 4:  # header + 3 rows
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _rows(out)
    assert 3 <= len(done_before) < 10
    with open(out, "a") as fh:  # a crash in the middle of writing a row
        fh.write("70\t3\t")

    # resuming with another batch size is allowed: it does not change any result
    proc = _run(_certify_args(checkpoint, out, n=3000, extra=seed + ("--noise-batch", "123")))
    assert proc.returncode == 0, proc.stderr
    assert "truncated" in proc.stderr
    rows = _rows(out)
    assert rows[: len(done_before)] == done_before  # kept, not recomputed (time column included)
    assert [r.split("\t")[0] for r in rows] == [r.split("\t")[0] for r in ref_rows]
    strip = lambda rs: [r.rsplit("\t", 1)[0] for r in rs]  # noqa: E731  (drop the time column)
    assert strip(rows) == strip(ref_rows)

    # a resume with other settings is refused with a clear message
    proc = _run(_certify_args(checkpoint, out, n=1000, extra=seed))
    assert proc.returncode == 2 and "other settings" in proc.stderr and "n" in proc.stderr


def test_results_log_repairs_and_refuses_corruption(tmp_path):
    path = tmp_path / "r.tsv"
    log = ResultsLog(path, {"a": 1})
    log.append(0, 3, 3, 0.5, 1.0)
    log.append(1, 2, -1, 0.0, 1.0)
    with open(path, "a") as fh:
        fh.write("2\t1\t1\t0.4")
    log = ResultsLog(path, {"a": 1})
    assert log.done == {0, 1} and log.repaired_bytes > 0
    assert path.read_text().endswith("\t1.0000\n")
    with pytest.raises(ResultsError, match="other settings"):
        ResultsLog(path, {"a": 2})
    text = path.read_text().splitlines()
    path.write_text("\n".join([text[0], "garbage", text[1]]) + "\n")
    with pytest.raises(ResultsError, match="corrupt"):
        ResultsLog(path, {"a": 1})
    path.write_text("idx\tlab")  # header cut short by a crash
    log = ResultsLog(path, {"a": 1})
    assert path.read_text() == HEADER + "\n" and not log.done


def test_cli_argument_errors(tmp_path, checkpoint):
    proc = _run(
        ["certify", "--checkpoint", str(checkpoint), "--dataset", "mnist", "--sigma", "-1", "--out", str(tmp_path / "x.tsv")]
    )
    assert proc.returncode == 2 and "--sigma" in proc.stderr
    proc = _run(
        [
            "certify",
            "--checkpoint",
            str(tmp_path / "none.safetensors"),
            "--dataset",
            "mnist",
            "--sigma",
            "0.25",
            "--out",
            str(tmp_path / "x.tsv"),
        ]
    )
    assert proc.returncode == 2 and "no such checkpoint" in proc.stderr
    proc = _run(
        [
            "certify",
            "--checkpoint",
            str(checkpoint),
            "--dataset",
            "cifar10",
            "--data-root",
            str(tmp_path),
            "--sigma",
            "0.25",
            "--out",
            str(tmp_path / "x.tsv"),
        ]
    )
    assert proc.returncode == 2 and "CIFAR-10" in proc.stderr
    proc = _run(
        [
            "certify",
            "--checkpoint",
            str(checkpoint),
            "--dataset",
            "mnist",
            "--sigma",
            "0.25",
            "--shard",
            "2",
            "--num-shards",
            "2",
            "--out",
            str(tmp_path / "x.tsv"),
        ]
    )
    assert proc.returncode == 2 and "--shard" in proc.stderr


def test_shards_partition_the_run(tmp_path, checkpoint, capsys):
    _no_near_ties(checkpoint, 200)
    whole = tmp_path / "whole.tsv"
    assert _run_here(_certify_args(checkpoint, whole), capsys).returncode == 0
    parts = []
    for k in range(3):
        out = tmp_path / f"shard{k}.tsv"
        assert _run_here(_certify_args(checkpoint, out, extra=("--shard", str(k), "--num-shards", "3")), capsys).returncode == 0
        parts += _rows(out)
    strip = lambda rs: sorted(r.rsplit("\t", 1)[0] for r in rs)  # noqa: E731
    assert strip(parts) == strip(_rows(whole))

    # merge the shards back into one table: the same rows and summary as the unsharded run
    shards = [str(tmp_path / f"shard{k}.tsv") for k in range(3)]
    merged = tmp_path / "merged.tsv"
    proc = _run_here(["merge", *reversed(shards), "--out", str(merged)], capsys)
    assert proc.returncode == 0, proc.stderr
    assert [r.rsplit("\t", 1)[0] for r in _rows(merged)] == strip(_rows(whole))  # idx order
    got, want = (json.loads(p.with_suffix(".json").read_text()) for p in (merged, whole))
    assert got["images"] == want["images"] == got["planned_images"] == 10
    assert got["acr"] == want["acr"] and got["certified_accuracy"] == want["certified_accuracy"]
    assert got["settings"]["merged_shards"] == [0, 1, 2] and merged.with_suffix(".png").exists()
    assert "ACR" in proc.stdout
    # refused: existing output, a missing shard, a shard twice, another run's shard, an unfinished shard
    assert _run_here(["merge", *shards, "--out", str(merged)], capsys).returncode == 2
    assert _run_here(["merge", *shards, "--out", str(merged), "--overwrite"], capsys).returncode == 0
    proc = _run_here(["merge", *shards[:2], "--out", str(tmp_path / "m2.tsv")], capsys)
    assert proc.returncode == 2 and "shards [2] of 3 are missing" in proc.stderr
    proc = _run_here(["merge", shards[0], shards[0], "--out", str(tmp_path / "m3.tsv")], capsys)
    assert proc.returncode == 2 and "shard 0 given twice" in proc.stderr
    other = tmp_path / "other.tsv"
    assert _run_here(_certify_args(checkpoint, other, n=100, extra=("--shard", "2", "--num-shards", "3")), capsys).returncode == 0
    proc = _run_here(["merge", *shards[:2], str(other), "--out", str(tmp_path / "m4.tsv")], capsys)
    assert proc.returncode == 2 and "another run" in proc.stderr and "n" in proc.stderr
    lines = Path(shards[1]).read_text().splitlines(keepends=True)
    Path(shards[1]).write_text("".join(lines[:-1]))  # shard 1 lost its last image
    proc = _run_here(["merge", *shards, "--out", str(tmp_path / "m5.tsv")], capsys)
    assert proc.returncode == 2 and "incomplete" in proc.stderr
    proc = _run_here(["merge", *shards, "--out", str(tmp_path / "m5.tsv"), "--allow-partial"], capsys)
    assert proc.returncode == 0 and json.loads((tmp_path / "m5.json").read_text())["images"] == 9



@pytest.mark.parametrize(
    "command,func,extra",
    [
        ("certify", "cmd_certify", ["--checkpoint", "c", "--dataset", "mnist", "--sigma", "0.5", "--out", "o.tsv"]),
        ("train", "cmd_train", ["--method", "gaussian", "--dataset", "mnist", "--arch", "lenet", "--sigma", "0.5", "--epochs",
                                "1", "--out", "m.safetensors"]),
        ("poison", "cmd_poison", ["--target-class", "8", "--sigma", "0.5", "--eps", "0.1", "--outer-steps", "1", "--out", "p"]),
        ("evaluate", "cmd_evaluate", ["--clean", "--target-class", "8", "--victim-method", "gaussian", "--sigma", "0.5",
                                      "--out-dir", "d"]),
    ],
)
def test_threads_option_sets_torch_threads(command, func, extra, monkeypatch):
    """--threads N reaches torch.set_num_threads before the command runs (long jobs on a shared machine)."""
    from engine import cli

    seen = []
    monkeypatch.setattr(cli, func, lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cli.main([command, *extra]) == 0
        assert cli.main([command, "--threads", "1", *extra]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 1]


def test_misspelt_cpu_isa_is_one_error(tmp_path, checkpoint):
    """ENGINE_CPU_ISA with a value the extension does not know: one error line naming the choices, exit 2."""
    from engine import _ext

    if not _ext.available():
        pytest.skip("engine._C not built: ENGINE_CPU_ISA is not read")
    env = {**os.environ, "ENGINE_CPU_ISA": "avx-2"}
    proc = subprocess.run([sys.executable, "-m", "engine", *_certify_args(checkpoint, tmp_path / "r.tsv")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ENGINE_CPU_ISA must be one of native, avx512, avx2, generic; got 'avx-2'" in proc.stderr
    assert not (tmp_path / "r.tsv").exists()
