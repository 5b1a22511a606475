import json
import os

import numpy as np
import pytest

from engine import metrics
from engine.plots import (
    MIN_RADIUS_LIMIT,
    TITLE_WIDTH,
    Run,
    _curve,
    legend_labels,
    plot_certified_accuracy,
    radius_limit,
    read_tsv,
    title_for,
    wrap_title,
)

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
SETTINGS = {"dataset": "cifar10", "split": "test", "sigma": 0.25, "n0": 100, "n": 100000, "alpha": 0.001}

# (idx, label, predict, radius): correct 0, 1, 3, 4; image 2 wrong, image 5 abstains
ROWS_A = [(0, 3, 3, 0.5), (1, 8, 8, 1.2), (2, 1, 7, 0.3), (3, 5, 5, 0.25), (4, 0, 0, 0.9), (5, 2, -1, 0.0)]
ROWS_B = [(0, 3, 3, 0.1), (1, 8, 1, 0.6), (2, 1, 1, 2.4), (3, 5, -1, 0.0)]


def _write_run(path, rows, settings=None, *, trailing=""):
    text = HEADER + "".join(f"{i}\t{y}\t{p}\t{r:.6f}\t{int(p == y)}\t0.0100\n" for i, y, p, r in rows)
    path.write_text(text + trailing)
    if settings is not None:
        arrays = [np.array([row[k] for row in rows]) for k in (2, 3, 1)]
        summary = {"settings": settings, "images": len(rows), **metrics.summary(*arrays)}
        path.with_suffix(".json").write_text(json.dumps(summary))
    return path


def _arrays(rows):
    return (np.array([r[2] for r in rows]), np.array([r[3] for r in rows], dtype=float), np.array([r[1] for r in rows]))


def test_from_log_reads_tsv_and_labels_from_summary(tmp_path):
    log = _write_run(tmp_path / "a.tsv", ROWS_A, SETTINGS)
    run = Run.from_log(log)
    pred, rad, lab = _arrays(ROWS_A)
    np.testing.assert_array_equal(run.prediction, pred)
    np.testing.assert_allclose(run.radius, rad)
    np.testing.assert_array_equal(run.labels, lab)
    assert run.label == "sigma=0.25, n=100000" and run.settings == SETTINGS and len(run) == 6
    # the JSON summary names the same run; an explicit label wins
    again = Run.from_log(log.with_suffix(".json"), label="clean")
    assert again.label == "clean"
    np.testing.assert_array_equal(again.prediction, pred)
    # no summary beside it: the file's stem
    bare = _write_run(tmp_path / "bare_run.tsv", ROWS_B)
    assert Run.from_log(bare).label == "bare_run"


def test_read_tsv_skips_a_line_being_written_and_refuses_damage(tmp_path):
    log = _write_run(tmp_path / "r.tsv", ROWS_A, trailing="6\t4\t4\t0.7")  # no newline: still being written
    assert read_tsv(log)[0].size == len(ROWS_A)
    bad = tmp_path / "bad.tsv"
    bad.write_text(HEADER + "0\t1\t1\t0.5\t1\n1\t1\t1\t0.5\t1\t0.1\n")
    with pytest.raises(ValueError, match="line 2"):
        read_tsv(bad)
    twice = _write_run(tmp_path / "twice.tsv", [ROWS_A[0], ROWS_A[0]])
    with pytest.raises(ValueError, match="twice"):
        read_tsv(twice)
    no_header = tmp_path / "nh.tsv"
    no_header.write_text("0\t1\t1\t0.5\t1\t0.1\n")
    with pytest.raises(ValueError, match="header"):
        read_tsv(no_header)
    with pytest.raises(ValueError, match="no certification log"):
        Run.from_log(tmp_path / "missing.json")


def test_legend_labels_carry_the_acr_of_engine_metrics():
    a, b = Run("clean", *_arrays(ROWS_A)), Run("poisoned", *_arrays(ROWS_B))
    acr_a, acr_b = metrics.acr(*_arrays(ROWS_A)), metrics.acr(*_arrays(ROWS_B))
    assert acr_a == pytest.approx((0.5 + 1.2 + 0.25 + 0.9) / 6)
    assert legend_labels([a, b]) == [f"clean (ACR {acr_a:.3f})", f"poisoned (ACR {acr_b:.3f})"]


def test_radius_limit_fits_the_correct_predictions():
    a, b = Run("a", *_arrays(ROWS_A)), Run("b", *_arrays(ROWS_B))
    assert radius_limit([a]) == pytest.approx(1.2 * 1.05)
    # the largest radius overall (2.4, image 2 of b) is a correct prediction; b's wrong 0.6 never counts
    assert radius_limit([a, b]) == pytest.approx(2.4 * 1.05)
    wrong_far = Run("w", [1, 2], [0.1, 50.0], [1, 1])  # 50 is the radius of a wrong prediction
    assert radius_limit([wrong_far]) == pytest.approx(MIN_RADIUS_LIMIT)
    none_right = Run("z", [-1, 0], [0.0, 0.0], [1, 1])
    assert radius_limit([none_right]) == MIN_RADIUS_LIMIT > 0
    assert radius_limit([a], minimum=3.0) == 3.0


def test_curve_is_the_exact_step_function():
    run = Run("a", *_arrays(ROWS_A))
    top = radius_limit([run])
    grid, acc = _curve(run, top)
    # drawn "steps-pre", the value on (grid[k-1], grid[k]] is acc[k]: check midpoints against metrics
    mids = (grid[:-1] + grid[1:]) / 2
    want = metrics.certified_accuracy(run.prediction, run.radius, run.labels, mids).numpy()
    np.testing.assert_allclose(acc[1:], want)
    assert grid[0] == 0 and grid[-1] == top and acc[0] == pytest.approx(4 / 6) and acc[-1] == 0


def test_plot_two_runs_into_one_png(tmp_path):
    a = Run.from_log(_write_run(tmp_path / "a.tsv", ROWS_A, SETTINGS), label="clean")
    b = Run.from_log(_write_run(tmp_path / "b.tsv", ROWS_B, {**SETTINGS, "poison": "p.safetensors"}), label="poisoned")
    out = tmp_path / "plots" / "compare.png"
    path, fig = plot_certified_accuracy([a, b], out, title=title_for(SETTINGS, 6, "class 8, poisoned"),
                                        subtitle="victim trained on the poisoned set", return_figure=True)
    assert path == out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 2_000_000
    assert [p.name for p in out.parent.iterdir()] == ["compare.png"]  # no temporary file left behind
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    for run, text in zip((a, b), texts):
        assert f"(ACR {metrics.acr(run.prediction, run.radius, run.labels):.3f})" in text
    assert ax.get_xlim() == pytest.approx((0.0, radius_limit([a, b])))
    assert ax.get_ylim() == (0.0, 1.0)
    assert all(line.get_drawstyle() == "steps-pre" for line in ax.get_lines())
    assert "class 8, poisoned" in fig._suptitle.get_text().replace("\n", " ")
    assert plot_certified_accuracy([a], tmp_path / "one.svg").read_bytes().lstrip().startswith(b"<?xml")
    assert plot_certified_accuracy([a], tmp_path / "one.pdf").read_bytes()[:5] == b"%PDF-"


def test_refuses_no_runs_empty_runs_and_unknown_formats(tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        plot_certified_accuracy([], tmp_path / "x.png")
    empty = Run("nothing yet", [], [], [])
    with pytest.raises(ValueError, match="nothing yet.*no images"):
        plot_certified_accuracy([Run("a", *_arrays(ROWS_A)), empty], tmp_path / "x.png")
    with pytest.raises(ValueError, match="suffix"):
        plot_certified_accuracy([Run("a", *_arrays(ROWS_A))], tmp_path / "x.jpeg")
    with pytest.raises(ValueError, match="differ in length"):
        Run("bad", [1, 2], [0.5], [1, 2])
    assert not os.listdir(tmp_path)


def test_titles_name_the_run_and_wrap_to_the_figure():
    title = title_for(SETTINGS, 500, "class 8, poisoned")
    for part in ("cifar10", "test", "sigma=0.25", "n=100000", "alpha=0.001", "500 images", "class 8, poisoned"):
        assert part in title
    assert title_for({}, 1) == "certified accuracy: 1 image"
    long = title_for({**SETTINGS, "dataset": "imagenet-validation-subset-of-a-very-long-name"}, 500,
                     "class 8, poisoned by PACD with a bilevel objective against a MACER-trained victim")
    assert len(long) > TITLE_WIDTH
    wrapped, size = wrap_title(long)
    lines = wrapped.split("\n")
    assert len(lines) >= 2 and all(len(line) <= TITLE_WIDTH for line in lines)
    assert " ".join(lines) == long and size < wrap_title("short")[1]
    assert all(len(line) <= 20 for line in wrap_title("x" * 50, width=20)[0].split("\n"))
