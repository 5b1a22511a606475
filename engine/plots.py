"""Certified-accuracy plots of one or more certification runs on one figure.

A run is read from its per-image log (``idx label predict radius correct time``, Cohen et al.'s
format, see :mod:`engine.results`) or from the JSON summary beside it (``r.tsv`` <-> ``r.json``)::

    from engine.plots import Run, plot_certified_accuracy, title_for

    clean = Run.from_log("runs/clean/certify.tsv", label="clean")
    poisoned = Run.from_log("runs/poisoned/certify.json", label="poisoned")
    plot_certified_accuracy([clean, poisoned], "compare.png",
                            title=title_for(clean.settings, len(clean), "class 8, poisoned"))

The curves are exact step functions: certified accuracy at radius ``r`` is the fraction of images
predicted correctly with a certified radius >= ``r`` (:func:`engine.metrics.certified_accuracy`),
which only changes at the radii of the correct predictions; the legend gives each run's ACR
(:func:`engine.metrics.acr`). matplotlib is imported only when a figure is drawn, and the figure is
rendered without pyplot (no global state, no display needed); the file is replaced atomically.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metrics
from .fileio import publish

__all__ = [
    "Run",
    "read_tsv",
    "plot_certified_accuracy",
    "title_for",
    "legend_labels",
    "radius_limit",
    "wrap_title",
    "FORMATS",
    "MIN_RADIUS_LIMIT",
    "TITLE_WIDTH",
]

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"  # engine.results.HEADER (no import: plots stay standalone)
HEADER_SAMPLES = HEADER + "\tsamples"
FORMATS = (".png", ".pdf", ".svg")
MIN_RADIUS_LIMIT = 0.5  # the x axis shows at least [0, 0.5], so a run with no certified image still shows
RADIUS_MARGIN = 1.05  # the x axis ends 5% past the largest certified radius of a correct prediction
TITLE_WIDTH = 64  # characters per title line at FIGSIZE
FIGSIZE = (6.4, 4.2)
DPI = 120
_MAX_STEPS = 4096  # breakpoints drawn per curve (beyond that the steps are narrower than a pixel)
_CHUNK = 1 << 22  # radii x images evaluated per call of metrics.certified_accuracy


def read_tsv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prediction, radius, labels) of a certification log, in file order.

    The first line must be the header; each further line has the 6 tab-separated columns. A last
    line without its newline (a run still writing, or cut by a crash) is left out; any other bad
    line, or an image logged twice, raises ValueError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the certification log ({exc})") from exc
    lines = text.split("\n")
    if len(lines) > 1:  # drop what follows the last newline: nothing, or a line still being written
        lines = lines[:-1]
    header = lines[0].rstrip("\r").split() if lines else []
    if header not in (HEADER.split(), HEADER_SAMPLES.split()):
        raise ValueError(f"{path}: not a certification log (the first line is not the header {HEADER!r}, with a "
                         "samples column for adaptive sampling)")
    columns = len(header)
    pred: list[int] = []
    rad: list[float] = []
    lab: list[int] = []
    seen: set[int] = set()
    for line_no, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            if len(fields) != columns:
                raise ValueError(f"{len(fields)} columns, expected {columns}")
            idx, label, predict, radius = int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3])
            correct, seconds = int(fields[4]), float(fields[5])
            if not math.isfinite(radius) or radius < 0:
                raise ValueError(f"radius {fields[3]}")
            if correct not in (0, 1) or not math.isfinite(seconds):
                raise ValueError("correct must be 0 or 1 and time finite")
        except ValueError as exc:
            raise ValueError(f"{path}: line {line_no}: bad row {line!r} ({exc})") from None
        if idx in seen:
            raise ValueError(f"{path}: line {line_no}: image {idx} appears twice")
        seen.add(idx)
        pred.append(predict)
        rad.append(radius)
        lab.append(label)
    return np.array(pred, dtype=np.int64), np.array(rad, dtype=np.float64), np.array(lab, dtype=np.int64)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _summary_beside(log: Path) -> Path | None:
    """The JSON summary of a log, if there is one: r.tsv -> r.json, r.txt -> r.txt.json (or r.json)."""
    if log.suffix.lower() in ("", ".tsv"):
        candidates = [log.with_suffix(".json")]
    else:
        candidates = [log.with_name(log.name + ".json"), log.with_suffix(".json")]
    return next((c for c in candidates if c.is_file()), None)


def _log_beside(summary: Path) -> Path:
    """The log a JSON summary belongs to: r.json -> r.tsv (or r.txt for r.txt.json, or r)."""
    candidates = [summary.with_suffix(".tsv"), summary.with_suffix("")]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ValueError(f"{summary}: no certification log beside this summary (looked for {candidates[0].name})")
    return found


def _read_settings(summary: Path) -> dict:
    data = json.loads(summary.read_text(encoding="utf-8"))
    settings = data.get("settings") if isinstance(data, dict) else None
    if not isinstance(settings, dict):
        raise ValueError(f"{summary}: not a results summary (no settings)")
    return settings


def _default_label(settings: dict, stem: str) -> str:
    parts = [f"{key}={_fmt(settings[key])}" for key in ("sigma", "n") if settings.get(key) is not None]
    return ", ".join(parts) if parts else stem


@dataclass
class Run:
    """One certification run: its legend label and per-image prediction, certified radius and label.

    ``settings`` (optional) are the run's settings from its JSON summary (for :func:`title_for`)."""

    label: str
    prediction: np.ndarray
    radius: np.ndarray
    labels: np.ndarray
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.prediction = np.asarray(self.prediction, dtype=np.int64).reshape(-1)
        self.radius = np.asarray(self.radius, dtype=np.float64).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if not (self.prediction.shape == self.radius.shape == self.labels.shape):
            raise ValueError(
                f"run {self.label!r}: prediction, radius and labels differ in length "
                f"({self.prediction.size}, {self.radius.size}, {self.labels.size})"
            )

    def __len__(self) -> int:
        return int(self.prediction.size)

    @classmethod
    def from_log(cls, path: str | os.PathLike, label: str | None = None) -> Run:
        """A run read from its TSV log, or from its JSON summary (then from the .tsv log beside it).

        The label defaults to the settings in the summary ("sigma=0.25, n=100000"), else the file's stem."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            summary: Path | None = path
            log = _log_beside(path)
        else:
            log = path
            summary = _summary_beside(path)
        settings: dict = {}
        if summary is not None:
            try:
                settings = _read_settings(summary)
            except (OSError, ValueError) as exc:
                if summary == path:  # asked for by name: say why it cannot be used
                    raise ValueError(f"{summary}: cannot read the summary ({exc})") from exc
        pred, rad, lab = read_tsv(log)
        stem = log.name[: -len(log.suffix)] if log.suffix else log.name
        return cls(label if label is not None else _default_label(settings, stem), pred, rad, lab, settings)


# ----------------------------------------------------------------------------------------------
# pieces of the figure (separate, so that they can be checked without drawing)
# ----------------------------------------------------------------------------------------------


def _check_runs(runs) -> list[Run]:
    runs = list(runs)
    if not runs:
        raise ValueError("nothing to plot: give at least one run")
    for i, run in enumerate(runs):
        if len(run) == 0:
            raise ValueError(f"run {i} ({run.label!r}) has no images")
    return runs


def legend_labels(runs: list[Run]) -> list[str]:
    """The legend entry of each run: "label (ACR 0.412)", the ACR from :func:`engine.metrics.acr`."""
    return [f"{run.label} (ACR {metrics.acr(run.prediction, run.radius, run.labels):.3f})" for run in _check_runs(runs)]


def radius_limit(runs: list[Run], *, minimum: float = MIN_RADIUS_LIMIT, margin: float = RADIUS_MARGIN) -> float:
    """Right end of the radius axis: ``margin`` times the largest radius of a correct prediction over all
    runs (past it every curve is 0), at least ``minimum``."""
    top = 0.0
    for run in _check_runs(runs):
        correct = run.prediction == run.labels
        if correct.any():
            top = max(top, float(run.radius[correct].max()))
    return max(float(minimum), top * float(margin))


def _curve(run: Run, top: float) -> tuple[np.ndarray, np.ndarray]:
    """(radii, certified accuracy) of a run from 0 to ``top``, to draw with ``drawstyle="steps-pre"``.

    Certified accuracy is constant on each (b_k-1, b_k], b the radii of the correct predictions, where it
    equals its value at b_k; so the curve at 0, at each b and at ``top`` drawn "steps-pre" is exact."""
    correct = run.prediction == run.labels
    breaks = np.unique(run.radius[correct])
    breaks = breaks[(breaks > 0) & (breaks < top)]
    if breaks.size > _MAX_STEPS:
        breaks = breaks[np.linspace(0, breaks.size - 1, _MAX_STEPS).round().astype(np.int64)]
    grid = np.concatenate([[0.0], breaks, [top]])
    step = max(1, _CHUNK // max(1, len(run)))
    acc = np.concatenate([
        metrics.certified_accuracy(run.prediction, run.radius, run.labels, grid[i : i + step]).numpy()
        for i in range(0, grid.size, step)
    ])
    return grid, acc


def wrap_title(text: str, width: int = TITLE_WIDTH) -> tuple[str, float]:
    """(``text`` wrapped to lines of at most ``width`` characters, font size): 12 pt on one line, smaller
    on more. Line breaks already in ``text`` are kept; words are not split at hyphens (data set names), only
    a word longer than a line is."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, width=width, break_on_hyphens=False) or [""])
    size = 12.0 if len(lines) == 1 else 10.5 if len(lines) == 2 else 9.0
    return "\n".join(lines), size


def title_for(settings: dict, images: int | None, extra: str | None = None) -> str:
    """A plot title from a run's settings: data set and split, sigma, n, alpha, number of images, then
    ``extra`` (e.g. "class 8, poisoned"). Settings that are missing are left out; so is the image count
    when ``images`` is None."""
    where = str(settings.get("dataset") or "")
    split = settings.get("split")
    if split:
        where = f"{where} ({split})" if where else f"{split} split"
    parts = [f"{key}={_fmt(settings[key])}" for key in ("sigma", "n", "alpha") if settings.get(key) is not None]
    if images is not None:
        parts.append(f"{int(images)} image{'' if int(images) == 1 else 's'}")
    title = "certified accuracy"
    if where:
        title += f" on {where}"
    if parts:
        title += ": " + ", ".join(parts)
    if extra:
        title += f"; {extra}"
    return title


def _shared_title(runs: list[Run]) -> str:
    """The default title: :func:`title_for` with the settings all runs share (and their image count if equal)."""
    settings = dict(runs[0].settings)
    for run in runs[1:]:
        settings = {k: v for k, v in settings.items() if k in run.settings and run.settings[k] == v}
    sizes = {len(run) for run in runs}
    return title_for(settings, sizes.pop() if len(sizes) == 1 else None)


# ----------------------------------------------------------------------------------------------
# the figure
# ----------------------------------------------------------------------------------------------


def plot_certified_accuracy(runs: list[Run], out: str | os.PathLike, *, title: str | None = None,
                            subtitle: str | None = None, return_figure: bool = False):
    """Certified accuracy against L2 radius of all ``runs`` on one figure, written to ``out``.

    The format is ``out``'s suffix (.png, .pdf or .svg); the file is replaced atomically. The radius axis
    runs from 0 to :func:`radius_limit`; the legend names each run with its ACR (:func:`legend_labels`);
    ``title`` (default: from the settings all runs share, :func:`title_for`) and ``subtitle`` are wrapped
    to the figure's width. Returns the path, or ``(path, figure)`` with ``return_figure`` (a
    ``matplotlib.figure.Figure`` not registered with pyplot, to inspect).

    Raises ValueError for no runs, a run with no images, or an unknown suffix."""
    out = Path(out)
    fmt = out.suffix.lower()
    if fmt not in FORMATS:
        raise ValueError(f"{out}: the plot's format comes from its suffix, one of {', '.join(FORMATS)}")
    runs = _check_runs(runs)
    labels = legend_labels(runs)
    top = radius_limit(runs)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = ("-", "--", "-.", ":")
    for i, (run, text) in enumerate(zip(runs, labels)):
        grid, acc = _curve(run, top)
        ax.plot(grid, acc, drawstyle="steps-pre", lw=1.8, ls=styles[(i // 10) % len(styles)], label=text,
                clip_on=False)  # lines at accuracy 0 or 1 stay whole
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_xlim(0.0, top)
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8 if len(runs) > 4 else 9, framealpha=0.85)
    head, size = wrap_title(title if title is not None else _shared_title(runs))
    if head:
        fig.suptitle(head, fontsize=size)
    if subtitle:
        text, size = wrap_title(subtitle, width=int(TITLE_WIDTH * 1.15))
        ax.set_title(text, fontsize=min(size, 9.5), color="0.3")

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=f".tmp{fmt}")
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=fmt[1:])
        publish(tmp, out)  # os.replace, with the permissions of a new file and an fsync
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return (out, fig) if return_figure else out
