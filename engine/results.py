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

__all__ = ["ResultsLog", "ResultsError", "HEADER", "summary_paths"]

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


class ResultsError(ValueError):
    """A results file is corrupt, or belongs to a run with other settings."""


def summary_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """(JSON summary, PNG plot) paths beside a results log: results.tsv -> results.json / .png."""
    out = Path(out)
    return out.with_suffix(".json"), out.with_suffix(".png")


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
            fh.write(f"{row[0]}\t{row[1]}\t{row[2]}\t{row[3]:.6f}\t{row[4]}\t{row[5]:.4f}\n")
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
        os.replace(tmp, self.json_path)
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
        os.replace(tmp, self.png_path)
        return self.png_path
