"""Run logs that cannot be corrupted: no output overwrites another, settings travel with the log, one
writer per file (by any name), one row validator for resume and merge, no litter, traceable results."""

import json
import re

import pytest
import torch

from engine import cli, data, models
from engine.fileio import ExclusiveLock
from engine.results import HEADER, SCHEMA_VERSION, ResultsError, ResultsLog, cpu_kind, merge_logs, read_log, summary_paths


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("logs") / "lenet.safetensors"
    models.save(models.lenet_mnist(), path, sigma=0.25)
    return path


def _certify(ckpt, out, *extra):
    return ["certify", "--checkpoint", str(ckpt), "--dataset", "mnist", "--n0", "5", "--n", "20", "--quiet",
            "--out", str(out), *extra]


def _rows(path):
    return path.read_text().splitlines()[1:]


def test_summary_and_plot_never_overwrite_the_log(tmp_path):
    assert summary_paths(tmp_path / "r.tsv") == (tmp_path / "r.json", tmp_path / "r.png")
    assert summary_paths(tmp_path / "r") == (tmp_path / "r.json", tmp_path / "r.png")
    assert summary_paths(tmp_path / "r.txt") == (tmp_path / "r.txt.json", tmp_path / "r.txt.png")
    for bad in ("r.json", "r.PNG", "r.svg", "r.tsv.lock"):
        with pytest.raises(ResultsError, match="the per-image log is a .tsv file"):
            summary_paths(tmp_path / bad)
        with pytest.raises(ResultsError):
            ResultsLog(tmp_path / bad, {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_out_json_and_writes_nothing(tmp_path, ckpt, capsys):
    assert cli.main(_certify(ckpt, tmp_path / "r.json", "--max", "1")) == 2
    assert "the per-image log is a .tsv file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_resume_without_its_settings_is_refused(tmp_path, ckpt, capsys):
    """The issue's case: sigma 0.25 on 4 images, the summary deleted, then sigma 0.5 on 8: refused, rows kept."""
    out = tmp_path / "r.tsv"
    assert cli.main(_certify(ckpt, out, "--sigma", "0.25", "--max", "4")) == 0
    rows = _rows(out)
    assert len(rows) == 4
    out.with_suffix(".json").unlink()
    capsys.readouterr()
    assert cli.main(_certify(ckpt, out, "--sigma", "0.5", "--max", "8")) == 2
    err = capsys.readouterr().err
    assert "has 4 rows but its summary" in err and "is missing" in err and "--overwrite" in err
    assert _rows(out) == rows
    out.with_suffix(".json").write_text("{truncated")  # unreadable: refused as well
    assert cli.main(_certify(ckpt, out, "--sigma", "0.25", "--max", "4")) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert cli.main(_certify(ckpt, out, "--sigma", "0.5", "--max", "8", "--overwrite")) == 0
    assert len(_rows(out)) == 8
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["sigma"] == 0.5


def test_a_log_without_rows_starts_again_without_its_summary(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text(HEADER + "\n")  # a crash between the log and its summary
    log = ResultsLog(path, {"a": 1})
    assert not log.done and json.loads(path.with_suffix(".json").read_text())["settings"] == {"a": 1}


def test_lock_follows_links_to_the_same_log(tmp_path, ckpt, capsys):
    out = tmp_path / "real.tsv"
    link = tmp_path / "link.tsv"
    link.symlink_to(out)
    with ExclusiveLock(out):
        assert cli.main(_certify(ckpt, link, "--max", "2")) == 2
    assert "is being written by another process" in capsys.readouterr().err
    assert not out.exists()


def _log_with(tmp_path, rows):
    """A finished 3-image certify log (images 0, 1, 2 of the embedded test split), its rows replaced by ``rows``."""
    path = tmp_path / "r.tsv"
    path.write_text(HEADER + "\n" + "".join(r + "\n" for r in rows))
    return path


def _row(idx, label, pred=None):
    pred = label if pred is None else pred
    return f"{idx}\t{label}\t{pred}\t0.100000\t{int(pred == label)}\t0.0100"


@pytest.mark.parametrize("case", ["duplicate", "outside", "label", "correct"])
def test_resume_and_merge_refuse_the_same_damaged_rows(tmp_path, case):
    _, labels = data.load_mnist(data.embedded_mnist_root(), "test")
    y = [int(v) for v in labels[:4]]
    rows = [_row(0, y[0]), _row(1, y[1])]
    rows.append({"duplicate": _row(1, y[1]), "outside": _row(3, y[3]), "label": _row(2, (y[2] + 1) % 10),
                 "correct": _row(2, y[2])[:-8] + "0\t0.0100"}[case])
    settings = {"command": "certify", "skip": 1, "max": 3, "shard": 0, "num_shards": 1}
    path = _log_with(tmp_path, rows)
    path.with_suffix(".json").write_text(json.dumps({"settings": settings, "planned_images": 3}))
    expected = {i: y[i] for i in range(3)}
    what = {"duplicate": "appears twice", "outside": "not in", "label": "label", "correct": "correct is"}[case]
    with pytest.raises(ResultsError, match=what):
        ResultsLog(path, settings, expected=expected)  # resume
    if case != "label":  # merge has no labels to compare with; the rest it refuses alike
        with pytest.raises(ResultsError, match=what):
            read_log(path)
        with pytest.raises(ResultsError, match=what):
            merge_logs([path], tmp_path / "merged.tsv", allow_partial=True)
    assert not (tmp_path / "merged.tsv").exists()


def test_merge_out_may_not_clobber_an_input_summary(tmp_path):
    a = tmp_path / "a"  # a log without suffix: its summary is a.json
    ResultsLog(a, {"shard": 0, "num_shards": 1})
    with pytest.raises(ResultsError, match="would overwrite"):
        merge_logs([a], tmp_path / "a.tsv")


def test_clean_exit_leaves_no_lock_and_results_are_traceable(tmp_path, ckpt):
    out = tmp_path / "r.tsv"
    assert cli.main(_certify(ckpt, out, "--max", "2")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png", "r.tsv"]
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["schema_version"] == SCHEMA_VERSION
    trace = summary["trace"]
    assert trace["checkpoint"] == str(ckpt) and summary["settings"]["checkpoint_sha256"]
    for key in ("dataset", "data_root", "backend", "precision", "device", "engine_version", "torch_version", "cpu",
                "cpu_kind"):
        assert key in trace, key
    assert trace["torch_version"] == torch.__version__ and trace["device"] == "cpu"
    assert trace["cpu_kind"] == cpu_kind()


def test_cpu_kind_names_model_family_and_vector_instructions():
    """Two CPUs sold under one generic model name are told apart by family.model.stepping and by the vector
    instruction sets oneDNN may use; flags it never uses do not matter; the name is safe for a folder."""
    xeon = {"model name": "Intel(R) Xeon(R) Processor", "cpu family": "6", "model": "167", "stepping": "1",
            "flags": "fpu sse2 avx2 fma avx512f avx512bw"}
    kind = cpu_kind(xeon)
    assert kind == "intel-r-xeon-r-processor-6.167.1-2d8baa"  # pinned: folders of stored victims carry it
    assert cpu_kind({**xeon, "model": "143"}) != kind
    assert cpu_kind({**xeon, "flags": xeon["flags"] + " avx512_bf16"}) != kind
    assert cpu_kind({**xeon, "flags": xeon["flags"] + " sse4_2 ht"}) == kind
    assert cpu_kind({**xeon, "flags": "avx512bw fma avx512f avx2"}) == kind  # order does not matter
    bare = cpu_kind({})  # no /proc/cpuinfo: the platform's name, fields unknown
    assert re.fullmatch(r"[a-z0-9-]+-x\.x\.x-[0-9a-f]{6}", bare), bare
    assert re.fullmatch(r"[a-z0-9.-]+", cpu_kind()) and not cpu_kind().startswith("-")


def test_a_run_failing_before_its_first_row_leaves_nothing(tmp_path, ckpt, monkeypatch):
    import engine.smoothing

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.smoothing, "certify", broken)
    with pytest.raises(RuntimeError, match="boom"):  # an engine bug: a traceback, but no litter
        cli.main(_certify(ckpt, tmp_path / "r.tsv", "--max", "2"))
    assert list(tmp_path.iterdir()) == []


def test_certify_prints_the_files_it_wrote(tmp_path, ckpt, capsys):
    out = tmp_path / "r.tsv"
    assert cli.main(_certify(ckpt, out, "--max", "1")) == 0
    assert f"wrote {out}, {tmp_path / 'r.json'}, {tmp_path / 'r.png'}" in capsys.readouterr().out


def test_finished_poison_run_removes_its_checkpoint(tmp_path, capsys):
    base = ["poison", "--target-class", "1", "--sigma", "0.25", "--eps", "0.1", "--outer-steps", "1", "--niter1", "1",
            "--niter2", "1", "--batch-clean", "16", "--batch-poison", "4", "--batch-val", "4", "--upper-k", "1",
            "--val-size", "100", "--quiet", "--device", "cpu"]
    out = tmp_path / "p.safetensors"
    assert cli.main(base + ["--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]
    kept = tmp_path / "k.safetensors"
    assert cli.main(base + ["--out", str(kept), "--keep-checkpoint"]) == 0
    assert (tmp_path / "k.safetensors.ckpt").exists()
    assert "kept the checkpoint" in capsys.readouterr().out
