"""Crash-safe certification logs in the classic tab-separated format, with resume.

One row per image: ``idx label predict radius correct time`` (Cohen et al.'s format). Every row is
flushed and fsync'ed when written, so a crash loses at most the image in flight; a truncated last
line left by a crash is cut off on the next open. The run's settings are kept in the JSON summary
next to the log; resuming with different settings is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import metrics
from .fileio import publish

__all__ = ["ResultsLog", "ResultsError", "HEADER", "summary_paths", "read_log", "merge_logs"]

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


class ResultsError(ValueError):
    """A results file is corrupt, or belongs to a run with other settings."""


def summary_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """(JSON summary, PNG plot) paths beside a results log: results.tsv -> results.json / .png."""
    out = Path(out)
    return out.with_suffix(".json"), out.with_suffix(".png")


def _format_row(row: tuple) -> str:
    """One log line (with its newline) of ``(idx, label, predict, radius, correct, seconds)``."""
    return f"{row[0]}\t{row[1]}\t{row[2]}\t{row[3]:.6f}\t{row[4]}\t{row[5]:.4f}\n"


def _parse(line: str) -> tuple[int, int, int, float, int, float]:
    fields = line.split("\t")
    if len(fields) != 6:
        raise ValueError(f"{len(fields)} fields")
    idx, label, pred = int(fields[0]), int(fields[1]), int(fields[2])
    radius, correct, seconds = float(fields[3]), int(fields[4]), float(fields[5])
    if correct not in (0, 1) or not np.isfinite(radius) or radius < 0:
        raise ValueError("bad values")
    return idx, label, pred, radius, correct, seconds


class ResultsLog:
    """Append-only certification log with resume.

    Args:
        path: the .tsv log. If it exists its complete rows are kept (``done``) and a truncated last
            line is repaired, unless ``overwrite``.
        settings: JSON-serialisable run settings; compared with the stored ones on resume.
    """

    def __init__(self, path: str | os.PathLike, settings: dict, *, overwrite: bool = False):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))
        self.json_path, self.png_path = summary_paths(self.path)
        self.rows: dict[int, tuple] = {}
        self.repaired_bytes = 0
        if self.path.exists() and not overwrite:
            self._check_settings()
            self._load_and_repair()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as fh:
                fh.write(HEADER + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        self.write_summary()

    # -- resume ---------------------------------------------------------------------------------
    def _check_settings(self) -> None:
        if not self.json_path.exists():
            return
        try:
            stored = json.loads(self.json_path.read_text()).get("settings")
        except json.JSONDecodeError:
            return  # a summary cut by a crash; the log itself is authoritative
        if stored is not None and stored != self.settings:
            diff = sorted(k for k in set(stored) | set(self.settings) if stored.get(k) != self.settings.get(k))
            raise ResultsError(
                f"{self.path} was written with other settings ({', '.join(diff)} differ); "
                "use another --out, or --overwrite to start again"
            )

    def _load_and_repair(self) -> None:
        raw = self.path.read_bytes()
        good_end = 0
        pos = 0
        first = True
        while pos < len(raw):
            nl = raw.find(b"\n", pos)
            if nl < 0:  # no newline: a line cut by a crash
                break
            line = raw[pos:nl].decode("utf-8", errors="replace")
            if first:
                if line != HEADER:
                    raise ResultsError(f"{self.path}: first line is not the header {HEADER!r}")
                first = False
            else:
                try:
                    row = _parse(line)
                except ValueError as exc:
                    if nl + 1 >= len(raw):  # damaged last line: drop it
                        break
                    raise ResultsError(f"{self.path}: corrupt row {line!r} ({exc}) before the last line") from exc
                self.rows[row[0]] = row
            good_end = nl + 1
            pos = nl + 1
        if first:  # empty file or header cut short
            good_end = 0
        self.repaired_bytes = len(raw) - good_end
        if self.repaired_bytes or first:
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                if first:
                    fh.seek(0)
                    fh.write((HEADER + "\n").encode())
                fh.flush()
                os.fsync(fh.fileno())

    @property
    def done(self) -> set[int]:
        return set(self.rows)

    # -- writing ----------------------------------------------------------------------------------
    def append(self, idx: int, label: int, predict: int, radius: float, seconds: float) -> None:
        correct = int(predict == label)
        row = (int(idx), int(label), int(predict), float(radius), correct, float(seconds))
        with open(self.path, "a") as fh:
            fh.write(_format_row(row))
            fh.flush()
            os.fsync(fh.fileno())
        self.rows[row[0]] = (row[0], row[1], row[2], float(f"{row[3]:.6f}"), row[4], row[5])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, radius, labels, seconds) of the logged images, in idx order."""
        rows = [self.rows[k] for k in sorted(self.rows)]
        pred = np.array([r[2] for r in rows], dtype=np.int64)
        rad = np.array([r[3] for r in rows], dtype=np.float64)
        lab = np.array([r[1] for r in rows], dtype=np.int64)
        sec = np.array([r[5] for r in rows], dtype=np.float64)
        return pred, rad, lab, sec

    def summary(self, radii=metrics.DEFAULT_RADII, extra: dict | None = None) -> dict:
        pred, rad, lab, sec = self.arrays()
        out = {"settings": self.settings, "images": int(pred.size)}
        if pred.size:
            out.update(metrics.summary(pred, rad, lab, radii))
            out["seconds_total"] = float(sec.sum())
            out["seconds_per_image"] = float(sec.mean())
        if extra:
            out.update(extra)
        return out

    def write_summary(self, extra: dict | None = None) -> dict:
        summ = self.summary(extra=extra)
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(summ, indent=2) + "\n")
        publish(tmp, self.json_path)
        return summ

    def plot(self) -> Path | None:
        """Certified accuracy against radius, as a PNG beside the log."""
        pred, rad, lab, _ = self.arrays()
        if pred.size == 0:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        top = max(2.0, float(rad.max()) * 1.05)
        grid = np.linspace(0.0, top, 400)
        acc = metrics.certified_accuracy(pred, rad, lab, grid).numpy()
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
        s = self.settings
        ax.plot(grid, acc, lw=2, label=f"sigma={s.get('sigma')}")
        ax.set_xlabel("L2 radius")
        ax.set_ylabel("certified accuracy")
        ax.set_ylim(0, 1)
        ax.set_xlim(0, top)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{s.get('dataset', '')} n={s.get('n')} alpha={s.get('alpha')} ({pred.size} images)")
        fig.tight_layout()
        tmp = self.png_path.with_name(self.png_path.stem + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        publish(tmp, self.png_path)
        return self.png_path


# ----------------------------------------------------------------------------------------------
# shards
# ----------------------------------------------------------------------------------------------


def read_log(path: str | os.PathLike) -> tuple[dict, dict[int, tuple]]:
    """(summary JSON, rows by idx) of a results log, read without changing anything.

    A line cut by a crash at the very end is ignored (``ResultsLog`` repairs it on resume); any
    other damage, a missing header or a missing summary raises :class:`ResultsError`.
    """
    path = Path(path)
    json_path, _ = summary_paths(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such results log")
    try:
        summary = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path}: cannot read its summary {json_path} ({exc})") from exc
    if not isinstance(summary, dict) or not isinstance(summary.get("settings"), dict):
        raise ResultsError(f"{json_path}: not a results summary (no settings)")
    raw = path.read_text(errors="replace")
    lines = raw.split("\n")
    if not lines or lines[0] != HEADER:
        raise ResultsError(f"{path}: first line is not the header {HEADER!r}")
    body = lines[1:-1]  # lines[-1]: text after the last newline ("" or a line cut by a crash: ignored)
    rows: dict[int, tuple] = {}
    for i, line in enumerate(body):
        try:
            row = _parse(line)
        except ValueError as exc:
            raise ResultsError(f"{path}: corrupt row {i + 2}: {line!r} ({exc})") from exc
        if row[0] in rows:
            raise ResultsError(f"{path}: image {row[0]} appears twice")
        rows[row[0]] = row
    return summary, rows


def merge_logs(paths, out: str | os.PathLike, *, allow_partial: bool = False, overwrite: bool = False) -> dict:
    """Merge the logs of ``certify --shard K --num-shards N`` runs into one log with its summary and plot.

    The shards must come from one run (identical settings apart from ``shard``), each shard exactly
    once, with no image twice, and, unless ``allow_partial``, each shard finished (as many rows as it
    planned). ``out`` gets the rows in idx order, a JSON summary and a PNG; returns the summary.
    """
    paths = [Path(p) for p in paths]
    out = Path(out)
    if not paths:
        raise ResultsError("nothing to merge: give the shard logs")
    if any(p.resolve() == out.resolve() for p in paths):
        raise ResultsError(f"--out {out} is one of the inputs")
    if out.exists() and not overwrite:
        raise ResultsError(f"{out} exists; use --overwrite to replace it")
    logs = [(p, *read_log(p)) for p in paths]
    base = {k: v for k, v in logs[0][1]["settings"].items() if k != "shard"}
    shards: dict[int, Path] = {}
    merged: dict[int, tuple] = {}
    for p, summary, rows in logs:
        settings = summary["settings"]
        other = {k: v for k, v in settings.items() if k != "shard"}
        if other != base:
            diff = sorted(k for k in set(other) | set(base) if other.get(k) != base.get(k))
            raise ResultsError(f"{p} belongs to another run than {paths[0]} ({', '.join(diff)} differ)")
        shard = int(settings.get("shard", 0))
        if shard in shards:
            raise ResultsError(f"shard {shard} given twice: {shards[shard]} and {p}")
        shards[shard] = p
        planned = summary.get("planned_images")
        if not allow_partial and planned is not None and len(rows) != int(planned):
            raise ResultsError(
                f"{p}: shard {shard} is incomplete ({len(rows)} of {planned} images); finish it (rerun the same "
                "certify command) or pass --allow-partial"
            )
        twice = sorted(set(rows) & set(merged))
        if twice:
            raise ResultsError(f"{p}: images {twice[:5]} are also in another shard")
        merged.update(rows)
    num_shards = int(base.get("num_shards", 1))
    missing = sorted(set(range(num_shards)) - set(shards))
    if missing and not allow_partial:
        raise ResultsError(f"shards {missing} of {num_shards} are missing (or pass --allow-partial)")
    settings = {**base, "merged_shards": sorted(shards), "shard": "merged"}
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = summary_paths(out)
    for stale in (out, json_path, png_path):  # --overwrite: the old summary must not block the new settings
        if stale.exists():
            stale.unlink()
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(HEADER + "\n")
        fh.writelines(_format_row(merged[idx]) for idx in sorted(merged))
    publish(tmp, out)
    log = ResultsLog(out, settings)
    planned = [s.get("planned_images") for _, s, _ in logs]
    extra = {"planned_images": sum(planned)} if all(x is not None for x in planned) and not missing else {}
    summary = log.write_summary(extra=extra)
    log.plot()
    return summary
