"""The predict and plot commands."""

import json

import pytest
import torch

import engine
from engine import cli, data, models


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = models.lenet_mnist()
    with torch.no_grad():
        model[-1].weight.mul_(20)
    path = tmp_path_factory.mktemp("pp") / "lenet.safetensors"
    models.save(model, path, sigma=0.25)
    return path


def test_predict_equals_the_api_and_writes_its_table(tmp_path, ckpt, capsys):
    out = tmp_path / "p.tsv"
    argv = ["predict", "--checkpoint", str(ckpt), "--dataset", "mnist", "--n", "200", "--alpha", "0.01", "--skip", "7",
            "--max", "140", "--seed", "3", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[0] == ["idx", "label", "predict", "correct", "time"]
    images, labels = data.load_mnist(data.embedded_mnist_root(), "test")
    ids = torch.arange(0, 140, 7)
    want = engine.predict(models.load(ckpt), data.to_float(images[ids]), sigma=0.25, n=200, alpha=0.01, seed=3,
                          image_ids=ids, progress=False)
    assert [int(r[0]) for r in rows[1:]] == ids.tolist()
    assert [int(r[2]) for r in rows[1:]] == want.tolist()
    assert [int(r[1]) for r in rows[1:]] == labels[ids].tolist()
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["accuracy"] == pytest.approx(float((want == labels[ids]).float().mean()))
    assert summary["abstain_rate"] == pytest.approx(float((want == -1).float().mean()))
    assert summary["settings"]["sigma"] == 0.25 and summary["trace"]["command"] == "predict"
    assert f"smoothed accuracy {summary['accuracy']:.4f}" in printed and f"wrote {out}" in printed
    assert cli.main(argv) == 2  # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite"]) == 0


def test_plot_several_runs_on_one_figure(tmp_path, ckpt, capsys):
    logs = []
    for sigma in ("0.25", "0.5"):
        log = tmp_path / f"s{sigma}.tsv"
        assert cli.main(["certify", "--checkpoint", str(ckpt), "--dataset", "mnist", "--sigma", sigma, "--n0", "10",
                         "--n", "100", "--max", "4", "--out", str(log), "--quiet"]) == 0
        logs.append(log)
    capsys.readouterr()
    fig = tmp_path / "both.png"
    assert cli.main(["plot", str(logs[0]), str(logs[1].with_suffix(".json")), "--label", "a", "--label", "b",
                     "--out", str(fig)]) == 0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "wrote" in capsys.readouterr().out
    assert cli.main(["plot", str(logs[0]), "--out", str(fig)]) == 2  # exists
    assert cli.main(["plot", str(logs[0]), "--label", "a", "--label", "b", "--out", str(tmp_path / "x.png")]) == 2
    assert cli.main(["plot", str(logs[0]), "--out", str(tmp_path / "x.gif")]) == 2
    assert cli.main(["plot", str(tmp_path / "none.tsv"), "--out", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err), err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
