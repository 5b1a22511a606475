"""Bad input on the command line: one ``error:`` line naming the input, exit status 2, never a traceback.

One place for the CLI layer's bad-input cases (the API's are in test_bad_input_api.py, the files' in
test_bad_input_files.py): add a case to CASES. Each runs ``engine.cli.main`` in this process.
"""

import errno
import json

import numpy as np
import pytest
import torch

from engine import cli, data, models


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_cli")
    torch.manual_seed(0)
    lenet = root / "lenet.safetensors"
    models.save(models.lenet_mnist(), lenet, sigma=0.25, method="gaussian")
    bare = root / "bare.safetensors"  # records no sigma
    models.save(models.lenet_mnist(), bare)
    resnet = root / "resnet20.safetensors"
    models.save(models.build("resnet20"), resnet, sigma=0.25)
    bad_meta = root / "bad_meta.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(bad_meta), metadata={"engine": "{not json"})
    empty = root / "empty_mnist"  # idx files holding 0 test images
    empty.mkdir()
    x, y = data.load_mnist(data.embedded_mnist_root(), "train")
    data.write_idx(empty / "train-images-idx3-ubyte", x[:50, 0].numpy())
    data.write_idx(empty / "train-labels-idx1-ubyte", y[:50].numpy().astype(np.uint8))
    data.write_idx(empty / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    data.write_idx(empty / "t10k-labels-idx1-ubyte", np.zeros((0,), np.uint8))
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    keep = root / "keep"  # files of the user's that no output may replace
    keep.mkdir()
    (keep / "cfg.json").write_text('{"important": 1}')
    (keep / "model.safetensors").write_bytes(lenet.read_bytes())
    from engine.pacd import random_poison

    split = data.split_validation(*data.load_mnist(data.embedded_mnist_root(), "train"), 100)[0]
    random_poison(split, target_class=8, eps=0.1, kind="vertex").encode(split, "sign").save(keep / "p.safetensors")
    (keep / "p.safetensors.ckpt").write_bytes(b"x")
    (keep / "ev").mkdir()
    (keep / "ev" / "certify.json").write_text(json.dumps({"settings": {"command": "evaluate"}}))
    return {"lenet": lenet, "bare": bare, "resnet": resnet, "bad_meta": bad_meta, "empty": empty, "a_file": a_file,
            "root": root, "keep": keep}


def _keep(f, name):
    return str(f["keep"] / name)


def _with_out(argv, path):
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(path)
    return argv


def _certify(f, out="r.tsv", *extra, ckpt="lenet"):
    return ["certify", "--checkpoint", str(f[ckpt]), "--dataset", "mnist", "--n0", "5", "--n", "20", "--max", "2",
            "--out", str(f["root"] / "out" / out), "--quiet", *extra]


def _poison(*extra):
    return ["poison", "--sigma", "0.25", "--eps", "0.1", "--outer-steps", "0", "--val-size", "100", "--quiet",
            "--out", "/nonexistent/never.safetensors", *extra]


def _evaluate(f, *extra):
    return ["evaluate", "--clean", "--target-class", "8", "--sigma", "0.25", "--epochs", "1", "--images", "2",
            "--val-size", "100", "--out-dir", str(f["root"] / "never_eval"), "--quiet", *extra]


TRAIN = ["train", "--method", "gaussian", "--dataset", "mnist", "--sigma", "0.25", "--epochs", "1", "--quiet"]

CASES = {  # name: (argv(files), text the error line must hold)
    "device cuda without CUDA": (lambda f: _certify(f, "r.tsv", "--device", "cuda"), "--device cuda: CUDA is not available"),
    "device gpu": (lambda f: _certify(f, "r.tsv", "--device", "gpu"), "--device: must be auto, cpu, cuda or cuda:N"),
    "backend triton without CUDA": (lambda f: _certify(f, "r.tsv", "--backend", "triton", "--device", "cpu"),
                                    "--backend triton needs a CUDA device"),
    "n 1e12": (lambda f: _certify(f, "r.tsv", "--n", "1e12"), "--n: must be an integer <= 4,294,967,296"),
    "n not a number": (lambda f: _certify(f, "r.tsv", "--n", "many"), "--n: must be an integer, got 'many'"),
    "max 0": (lambda f: _certify(f, "r.tsv", "--max", "0"), "--max: must be -1 (all images) or an index >= 1"),
    "max -5": (lambda f: _certify(f, "r.tsv", "--max", "-5"), "--max: must be an integer >= -1"),
    "empty data set": (lambda f: _certify(f, "r.tsv", "--data-root", str(f["empty"])), "the selection is empty"),
    "empty shard": (lambda f: _certify(f, "r.tsv", "--num-shards", "3", "--shard", "2"), "the selection is empty"),
    "out r.json": (lambda f: _certify(f, "r.json"), "r.json: the per-image log is a .tsv file"),
    "out r.png": (lambda f: _certify(f, "r.png"), "r.png: the per-image log is a .tsv file"),
    "out under a file": (lambda f: _certify(f, "x") [:-3] + ["--out", str(f["a_file"] / "r.tsv"), "--quiet"],
                         "a_file"),
    "cifar resnet on mnist": (lambda f: _certify(f, "r.tsv", ckpt="resnet"), "does not accept images of shape (1, 28, 28)"),
    "no sigma recorded": (lambda f: _certify(f, "r.tsv", ckpt="bare"), "--sigma is required"),
    "checkpoint metadata not JSON": (lambda f: _certify(f, "r.tsv", ckpt="bad_meta"), "bad_meta.safetensors"),
    "renamed --batch in certify": (lambda f: _certify(f, "r.tsv", "--batch", "100"), "--batch was renamed --noise-batch"),
    "renamed --batch in train": (lambda f: TRAIN + ["--arch", "lenet", "--batch", "64", "--out", "m.safetensors"],
                                 "--batch was renamed --batch-size"),
    "unknown arch": (lambda f: TRAIN + ["--arch", "lenet9", "--out", "m.safetensors"], "--arch"),
    "unknown arch of poison": (lambda f: _poison("--target-class", "1", "--arch", "lenet9"), "--arch"),
    "train size too large": (lambda f: TRAIN + ["--arch", "lenet", "--train-size", "20000", "--out",
                                                str(f["root"] / "never.safetensors")], "--train-size 20000"),
    "train resnet20 on mnist": (lambda f: TRAIN + ["--arch", "resnet20", "--train-size", "64", "--out",
                                                   str(f["root"] / "never2.safetensors")],
                                "does not accept images of shape (1, 28, 28)"),
    "poison target class 12": (lambda f: _poison("--target-class", "12"), "--target-class 12: mnist has classes 0..9"),
    "poison eps 2": (lambda f: _poison("--target-class", "1", "--eps", "2"), "--eps: must lie in (0, 1]"),
    "poison unknown method-args": (lambda f: _poison("--target-class", "1", "--method", "macer", "--method-args",
                                                     '{"kk": 2}'), "--method-args"),
    "poison method-args not JSON": (lambda f: _poison("--target-class", "1", "--method-args", "{k: 2}"),
                                    "--method-args must be a JSON object"),
    "evaluate unknown method-args": (lambda f: _evaluate(f, "--victim-method", "macer", "--method-args", '{"kk": 1}'),
                                     "--method-args"),
    "evaluate target class 10": (lambda f: _evaluate(f)[:3] + ["10"] + _evaluate(f)[4:], "--target-class 10"),
    "certify over an unrelated summary": (lambda f: _certify(f)[:-3] + ["--out", _keep(f, "cfg.tsv"), "--quiet"],
                                           "cfg.json exists; pass --overwrite"),
    "certify over its own checkpoint": (lambda f: _certify(f)[:-3] + ["--out", _keep(f, "model.safetensors"),
                                                                       "--overwrite", "--checkpoint",
                                                                       _keep(f, "model.safetensors")],
                                        "an input of this command"),
    "predict over its own checkpoint": (lambda f: ["predict", "--checkpoint", _keep(f, "model.safetensors"), "--dataset",
                                                   "mnist", "--n", "20", "--max", "2", "--overwrite", "--out",
                                                   _keep(f, "model.safetensors")], "an input of this command"),
    "out empty": (lambda f: _certify(f)[:-3] + ["--out", ""], "--out: must name a file"),
    "out dot": (lambda f: _certify(f)[:-3] + ["--out", "."], "--out: must name a file"),
    "out trailing slash": (lambda f: _certify(f)[:-3] + ["--out", str(f["root"] / "newdir") + "/"], "must name a file"),
    "out under a log file": (lambda f: _certify(f)[:-3] + ["--out", str(f["a_file"] / "x" / "r.tsv")],
                             "is a file, not a folder"),
    "out where no lock can be made": (lambda f: _certify(f)[:-3] + ["--out", "/proc/engine-r.tsv"],
                                      "cannot create the lock file"),
    "poison resume over a finished poison": (lambda f: _with_out(_poison("--target-class", "1", "--resume"),
                                                                 _keep(f, "model.safetensors")),
                                             "model.safetensors exists: give another --out, continue crafting from it"),
    "poison over an existing file": (lambda f: _with_out(_poison("--target-class", "1"), _keep(f, "cfg.json")),
                                     "cfg.json exists"),
    "poison method-args k two": (lambda f: _poison("--target-class", "1", "--method", "macer", "--method-args",
                                                   '{"k": "two"}'), "--method-args"),
    "poison method-args k -2": (lambda f: _poison("--target-class", "1", "--method", "macer", "--method-args",
                                                  '{"k": -2}'), "--method-args"),
    "poison renamed --k": (lambda f: _poison("--target-class", "1", "--k", "3"), "--k was renamed --upper-k"),
    "train renamed --eps": (lambda f: TRAIN + ["--arch", "lenet", "--eps", "1", "--out", "m.safetensors"],
                            "--eps was renamed --attack-eps"),
    "train over an existing model": (lambda f: TRAIN + ["--arch", "lenet", "--train-size", "64", "--out",
                                                        _keep(f, "model.safetensors")], "exists; pass --overwrite"),
    "train onto its own weights": (lambda f: TRAIN + ["--arch", "lenet", "--train-size", "64", "--overwrite", "--weights",
                                                      _keep(f, "model.safetensors"), "--out",
                                                      _keep(f, "model.safetensors")], "an input of this command"),
    "snapshot onto its checkpoint": (lambda f: ["poison-snapshot", _keep(f, "p.safetensors.ckpt"), "--out",
                                                _keep(f, "p.safetensors.ckpt"), "--overwrite"], "an input of this command"),
    "encode onto its input": (lambda f: ["poison-encode", _keep(f, "p.safetensors"), "--encoding", "float32", "--out",
                                         _keep(f, "p.safetensors"), "--overwrite"], "an input of this command"),
    "combine a poison twice": (lambda f: ["poison-combine", _keep(f, "p.safetensors"), _keep(f, "p.safetensors"), "--how",
                                          "mean", "--out", str(f["root"] / "never_c.safetensors")], "given twice"),
    "random onto its like": (lambda f: ["poison-random", "--kind", "twin", "--like", _keep(f, "p.safetensors"), "--out",
                                        _keep(f, "p.safetensors"), "--overwrite"], "an input of this command"),
    "random over a model": (lambda f: ["poison-random", "--kind", "vertex", "--target-class", "8", "--eps", "0.1",
                                       "--out", _keep(f, "model.safetensors")], "exists; pass --overwrite"),
    "make-subset onto its source": (lambda f: ["make-subset", "--src", str(f["empty"]), "--dst", str(f["empty"])],
                                    "is the --src folder"),
    "make-subset more than the source": (lambda f: ["make-subset", "--src", str(data.embedded_mnist_root()), "--dst",
                                                    str(f["root"] / "never_sub"), "--train", "20000"],
                                         "--train 20000"),
    "demo over an evaluation": (lambda f: ["demo", "--out-dir", _keep(f, "ev")], "holds the results of another command"),
    "evaluate clean without class": (lambda f: ["evaluate", "--clean", "--sigma", "0.25", "--out-dir",
                                                str(f["root"] / "e9")], "--clean needs --target-class"),
    "evaluate poison metadata not JSON": (lambda f: ["evaluate", "--poison", str(f["bad_meta"]), "--sigma", "0.25",
                                                     "--val-size", "100", "--out-dir", str(f["root"] / "e2")],
                                          "bad_meta.safetensors"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_error_is_one_line(name, files, capsys, monkeypatch):
    argv, expected = CASES[name]
    if "without CUDA" in name:
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    try:
        status = cli.main(argv(files))
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "error: " in lines[-1], err
    assert sum("error: " in line for line in lines) == 1, err
    assert expected in lines[-1], err
    assert not (files["root"] / "out").exists() or not any((files["root"] / "out").iterdir())  # nothing written
    keep = files["keep"]  # no file of the user's replaced, nothing added beside them
    assert sorted(p.name for p in keep.iterdir()) == ["cfg.json", "ev", "model.safetensors", "p.safetensors",
                                                      "p.safetensors.ckpt"]
    assert (keep / "cfg.json").read_text() == '{"important": 1}' and (keep / "p.safetensors.ckpt").read_bytes() == b"x"
    assert (keep / "model.safetensors").read_bytes() == files["lenet"].read_bytes()
    assert not (files["root"] / "never_sub").exists()


def test_a_different_sigma_warns_in_one_line(files, capsys):
    out = files["root"] / "warn" / "r.tsv"
    argv = ["certify", "--checkpoint", str(files["lenet"]), "--dataset", "mnist", "--n0", "5", "--n", "20", "--max", "1",
            "--sigma", "0.5", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: --sigma 0.5 differs from the sigma 0.25 recorded in " + str(files["lenet"]) +
                   " (the noise level the model was trained with); certifying at 0.5"]
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["sigma"] == 0.5
    out2 = files["root"] / "warn" / "recorded.tsv"  # without --sigma: the recorded one, no warning
    assert cli.main(argv[:-5] + ["--out", str(out2), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads(out2.with_suffix(".json").read_text())["settings"]["sigma"] == 0.25


def test_disk_full_is_one_line_and_keeps_the_rows_written(files, capsys, monkeypatch):
    from engine.results import ResultsLog

    real = ResultsLog.append
    calls = []

    def append(self, *row):
        calls.append(row)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, *row)

    monkeypatch.setattr(ResultsLog, "append", append)
    out = files["root"] / "full" / "r.tsv"
    argv = ["certify", "--checkpoint", str(files["lenet"]), "--dataset", "mnist", "--n0", "5", "--n", "20", "--max", "3",
            "--out", str(out), "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: disk full writing {out}") and "is kept" in err[0]
    assert len(out.read_text().splitlines()) == 2  # header + the first row
    monkeypatch.setattr(ResultsLog, "append", real)
    assert cli.main(argv) == 0  # space again: the same command continues
    assert len(out.read_text().splitlines()) == 4


def test_every_option_has_help_and_shows_its_default():
    import argparse

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"certify", "predict", "plot", "train", "poison", "evaluate", "merge"} <= set(sub.choices)
    meanings = {}
    for name, p in sub.choices.items():
        text = p.format_help()
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            opt = action.option_strings[0]
            assert action.help, f"{name} {opt} has no help"
            if action.default not in (None, False) and not action.required:
                assert f"(default: {action.default})" in " ".join(text.split()), f"{name} {opt} hides its default"
            meanings.setdefault(opt, set()).add(action.dest)
    assert "--batch" not in meanings  # a former name: refused with the new one, not a second meaning
    assert all(len(dests) == 1 for dests in meanings.values()), meanings


def test_interrupt_is_one_line_and_leaves_nothing_before_the_first_row(files, capsys, monkeypatch):
    import engine.smoothing

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.smoothing, "certify", interrupted)
    out = files["root"] / "intr" / "r.tsv"
    assert cli.main(_certify(files)[:-3] + ["--out", str(out), "--quiet"]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["interrupted: what was written is kept; run the same command again to continue"]
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_safetensors_write_error_is_one_line(files, capsys, monkeypatch):
    from safetensors import SafetensorError

    from engine import models as models_module

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(models_module, "save", full)
    out = files["root"] / "full_train" / "m.safetensors"
    assert cli.main(TRAIN + ["--arch", "lenet", "--train-size", "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: cannot write a safetensors file") and "No space left" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_merge_refuses_a_merged_log(files, capsys):
    shards = []
    for k in range(2):
        log = files["root"] / "mg" / f"s{k}.tsv"
        assert cli.main(_certify(files)[:-3] + ["--out", str(log), "--quiet", "--shard", str(k), "--num-shards", "2"]) == 0
        shards.append(str(log))
    merged = files["root"] / "mg" / "all.tsv"
    assert cli.main(["merge", *shards, "--out", str(merged)]) == 0
    capsys.readouterr()
    assert cli.main(["merge", str(merged), "--out", str(files["root"] / "mg" / "again.tsv"), "--allow-partial"]) == 2
    assert "already merged log" in capsys.readouterr().err
    trace = json.loads(merged.with_suffix(".json").read_text())["trace"]
    assert trace["command"] == "merge" and trace["checkpoint"] == str(files["lenet"]) and trace["dataset"] == "mnist"
    (files["root"] / "mg" / "x.json").write_text("{}")  # merge --out over an unrelated summary
    assert cli.main(["merge", *shards, "--out", str(files["root"] / "mg" / "x.tsv")]) == 2
    assert "x.json exists" in capsys.readouterr().err


def test_merge_checks_the_rows_labels_against_the_data_set(files, capsys):
    shards = []
    for k in range(2):
        log = files["root"] / "ml" / f"s{k}.tsv"
        assert cli.main(_certify(files)[:-3] + ["--out", str(log), "--quiet", "--shard", str(k), "--num-shards", "2"]) == 0
        shards.append(log)
    lines = shards[0].read_text().splitlines()
    idx, label, pred, radius, correct, t = lines[1].split("\t")
    wrong = (int(label) + 1) % 10  # an edited label, its correct column made consistent
    lines[1] = "\t".join([idx, str(wrong), pred, radius, str(int(int(pred) == wrong)), t])
    shards[0].write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert cli.main(["merge", *map(str, shards), "--out", str(files["root"] / "ml" / "all.tsv")]) == 2
    assert f"label {wrong} but the data set's label of image {idx} is {label}" in capsys.readouterr().err
