"""Crash-safe certification logs in the classic tab-separated format, with resume.

One row per image: ``idx label predict radius correct time`` (Cohen et al.'s format), and a seventh column
``samples`` (selection plus estimation samples drawn) in the logs of adaptive sampling. Every row is
flushed and fsync'ed when written, so a crash loses at most the image in flight; a truncated last
line left by a crash is cut off on the next open. The run's settings travel with the log in the JSON
summary beside it (``r.tsv`` -> ``r.json``, plot ``r.png``): a resume with other settings is refused,
and so is a resume of a log with rows whose summary is missing or unreadable (the settings its rows
were made with cannot be checked), unless the caller starts over. Resume and :func:`merge_logs`
validate the rows with one function, :func:`validate_rows`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import metrics
from .fileio import publish

__all__ = ["ResultsLog", "ResultsError", "HEADER", "HEADER_SAMPLES", "header_for", "SCHEMA_VERSION", "summary_paths",
           "read_log", "merge_logs", "validate_rows", "in_selection", "run_trace",
           "cpu_kind"]

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
HEADER_SAMPLES = HEADER + "\tsamples"  # adaptive sampling: the samples each image drew


def header_for(settings: dict) -> str:
    """The header of a log made with ``settings``: with the samples column when its sampling is adaptive."""
    return HEADER_SAMPLES if settings.get("sampling", "fixed") != "fixed" else HEADER
SCHEMA_VERSION = 2  # of the JSON summary: 2 added schema_version and trace
_NOT_A_LOG = (".json", ".png", ".pdf", ".svg", ".lock", ".tmp")


class ResultsError(ValueError):
    """A results file is corrupt, or belongs to a run with other settings."""


def summary_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """(JSON summary, PNG plot) paths beside a results log: r.tsv -> r.json / r.png; a log with another
    suffix keeps it (r.txt -> r.txt.json / r.txt.png), so that two logs never share a summary.

    Raises ResultsError for a log named like one of the files written beside it (r.json, r.png, ...):
    the summary or the plot would overwrite the log."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix in _NOT_A_LOG:
        raise ResultsError(
            f"{out}: the per-image log is a .tsv file (its summary .json and plot .png are written beside it); "
            f"give e.g. {out.with_suffix('.tsv')}"
        )
    if suffix in ("", ".tsv"):
        return out.with_suffix(".json"), out.with_suffix(".png")
    return out.with_name(out.name + ".json"), out.with_name(out.name + ".png")


def in_selection(settings: dict):
    """The test ``idx -> bool`` of Cohen et al.'s selection recorded in a run's settings (``skip``, ``max``,
    ``shard``, ``num_shards``; absent keys select everything), or None when the settings record none."""
    if not any(k in settings for k in ("skip", "max", "shard", "num_shards")):
        return None
    try:
        skip = int(settings.get("skip", 1))
        stop = int(settings.get("max", -1))
        shard = settings.get("shard", 0)
        num_shards = int(settings.get("num_shards", 1))
    except (TypeError, ValueError):
        return None
    if skip < 1 or num_shards < 1:
        return None
    merged = shard == "merged"
    shards = set(settings.get("merged_shards", [])) if merged else {int(shard)}

    def test(idx: int) -> bool:
        if idx < 0 or idx % skip or (stop >= 0 and idx >= stop):
            return False
        return (idx // skip) % num_shards in shards

    return test


def validate_rows(rows, path, *, settings: dict | None = None, expected: dict | None = None) -> dict[int, tuple]:
    """The one check of a log's parsed rows, shared by resume and :func:`merge_logs`: rows by idx.

    Refuses (ResultsError naming ``path`` and the row) an image logged twice, an index outside the
    selection recorded in ``settings`` (:func:`in_selection`) or outside ``expected``, a label other than
    ``expected[idx]`` (``expected``: the labels of the images the run certifies, idx -> label) and a
    ``correct`` column that disagrees with label and prediction."""
    chosen = in_selection(settings) if settings is not None else None
    out: dict[int, tuple] = {}
    for line_no, row in rows:
        idx = row[0]
        where = f"{path}: line {line_no} (image {idx})"
        if idx in out:
            raise ResultsError(f"{where}: image {idx} appears twice")
        if chosen is not None and not chosen(idx):
            raise ResultsError(f"{where}: image {idx} is not in the selection its settings record")
        if expected is not None:
            if idx not in expected:
                raise ResultsError(f"{where}: image {idx} is not in this run's selection of {len(expected)} images")
            if row[1] != expected[idx]:
                raise ResultsError(f"{where}: label {row[1]} but the data set's label of image {idx} is {expected[idx]}")
        if row[4] != int(row[2] == row[1]):
            raise ResultsError(f"{where}: correct is {row[4]} but label {row[1]} and prediction {row[2]} say otherwise")
        out[idx] = row
    return out


def _split_rows(raw: bytes, path: Path, header: str = HEADER) -> tuple[list[tuple[int, tuple]], int, bool]:
    """(rows with their 1-based line numbers, bytes of the intact part, header present) of a log's bytes.

    A line without its newline at the very end (cut by a crash) and a damaged last line are left out
    of the intact part; damage anywhere else raises ResultsError."""
    rows: list[tuple[int, tuple]] = []
    good_end = pos = 0
    first = True
    line_no = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        if nl < 0:  # no newline: a line cut by a crash
            break
        line_no += 1
        line = raw[pos:nl].decode("utf-8", errors="replace")
        if first:
            if line != header:
                raise ResultsError(f"{path}: first line is not the header {header!r} its settings call for")
            first = False
        else:
            try:
                row = _parse(line, header.count("\t") + 1)
            except ValueError as exc:
                if nl + 1 >= len(raw):  # damaged last line: drop it
                    break
                raise ResultsError(f"{path}: corrupt row {line!r} at line {line_no} ({exc}) before the last line") from exc
            rows.append((line_no, row))
        good_end = nl + 1
        pos = nl + 1
    return rows, (0 if first else good_end), not first


def run_trace(**extra) -> dict:
    """What traces a run's results: engine, torch and Python versions, the CPU (model and :func:`cpu_kind`), the
    time; plus ``extra`` (checkpoint path, data root, backend, precision, device, ...). Recorded in the JSON
    summary's ``trace``, never compared on resume."""
    import platform
    import time

    import torch

    from ._version import __version__

    info = _cpuinfo()  # read once for the model and the kind
    return {
        "engine_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cpu": _cpu_model(info),
        "cpu_kind": cpu_kind(info),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


# the vector instruction sets oneDNN and MKL choose their kernels by (they decide a CPU kind's rounding)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _cpu_model(info: dict | None = None) -> str:
    info = _cpuinfo() if info is None else info
    if info.get("model name"):
        return info["model name"]
    import platform

    return platform.processor() or platform.machine()


def cpu_kind(info: dict | None = None) -> str:
    """This machine's CPU kind, a name for a folder: the model name, family.model.stepping and a short hash of the
    vector instruction sets oneDNN may use, e.g. ``intel-r-xeon-r-processor-6.167.1-a745a0``. Training and
    certification are not bit-reproducible across kinds (a generic model name such as "Intel(R) Xeon(R) Processor"
    covers several), so paired comparisons stay within one. ``info``: /proc/cpuinfo's fields (read when None)."""
    import hashlib

    info = _cpuinfo() if info is None else info
    slug = "".join(ch if ch.isalnum() else "-" for ch in _cpu_model(info).lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    flags = set(info.get("flags", "").split())
    isa = hashlib.sha256(" ".join(f for f in ISA_FLAGS if f in flags).encode()).hexdigest()[:6]
    fms = ".".join(info.get(k, "x") for k in ("cpu family", "model", "stepping"))
    return f"{slug or 'unknown'}-{fms}-{isa}"


def _radius_down(radius: float) -> float:
    """The radius as the log stores it: 6 decimals, rounded down (a certificate is never written larger than made)."""
    stored = float(f"{radius:.6f}")
    return stored if stored <= radius else float(f"{stored - 1e-6:.6f}")  # idempotent on stored values


def _format_row(row: tuple) -> str:
    """One log line (with its newline) of ``(idx, label, predict, radius, correct, seconds[, samples])``."""
    line = f"{row[0]}\t{row[1]}\t{row[2]}\t{_radius_down(row[3]):.6f}\t{row[4]}\t{row[5]:.4f}"
    return line + (f"\t{row[6]}\n" if len(row) > 6 else "\n")


def _parse(line: str, columns: int = 6) -> tuple:
    fields = line.split("\t")
    if len(fields) != columns:
        raise ValueError(f"{len(fields)} fields")
    idx, label, pred = int(fields[0]), int(fields[1]), int(fields[2])
    radius, correct, seconds = float(fields[3]), int(fields[4]), float(fields[5])
    if correct not in (0, 1) or not np.isfinite(radius) or radius < 0:
        raise ValueError("bad values")
    if columns == 7:
        samples = int(fields[6])
        if samples < 1:
            raise ValueError("bad samples")
        return idx, label, pred, radius, correct, seconds, samples
    return idx, label, pred, radius, correct, seconds


class ResultsLog:
    """Append-only certification log with resume.

    Args:
        path: the .tsv log. If it exists its complete rows are kept (``done``) and a truncated last
            line is repaired, unless ``overwrite``.
        settings: JSON-serialisable run settings; a log with rows is resumed only if the settings in
            its summary are these (a missing or unreadable summary is refused too).
        overwrite: start again (the old log, summary and plot are replaced).
        expected: optional {idx: label} of the images this run certifies: a resumed row outside it, or
            with another label, is refused (:func:`validate_rows`).
        trace: what traces the run (:func:`run_trace`), written to the summary, not compared.
    """

    def __init__(self, path: str | os.PathLike, settings: dict, *, overwrite: bool = False, expected: dict | None = None,
                 trace: dict | None = None):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))
        self.trace = None if trace is None else json.loads(json.dumps(trace))
        self.json_path, self.png_path = summary_paths(self.path)
        self.header = header_for(self.settings)
        self.rows: dict[int, tuple] = {}
        self.repaired_bytes = 0
        self.created = False  # this object made the log (a failed run may then remove it: :meth:`discard`)
        if self.path.exists() and not overwrite:
            raw = self.path.read_bytes()
            first = raw.split(b"\n", 1)[0].decode("utf-8", errors="replace")
            if first in (HEADER, HEADER_SAMPLES) and first != self.header:  # a log of the other sampling
                if raw[len(first) + 1 :].strip():
                    self._check_settings(raw.count(b"\n") - 1)  # its rows: refused as other settings
                raw = b""  # only its header: started again with this run's
            rows, good_end, has_header = _split_rows(raw, self.path, self.header)
            if rows:
                self._check_settings(len(rows))
            self.rows = validate_rows(rows, self.path, settings=self.settings, expected=expected)
            self._repair(raw, good_end, has_header)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(self.header + "\n")
            publish(tmp, self.path)  # a fresh log replaces an old one in one step (overwrite)
            if self.png_path.exists():  # an old run's plot
                self.png_path.unlink()
            self.created = True
        self.write_summary()

    # -- resume ---------------------------------------------------------------------------------
    def _check_settings(self, rows: int) -> None:
        again = "restore it, or pass --overwrite (overwrite=True) to start again"
        try:
            stored = json.loads(self.json_path.read_text())
        except FileNotFoundError:
            raise ResultsError(
                f"{self.path} has {rows} rows but its summary {self.json_path}, which records the settings they were "
                f"made with, is missing, so a resume cannot check them; {again}"
            ) from None
        except (OSError, ValueError) as exc:
            raise ResultsError(
                f"{self.path} has {rows} rows but its summary {self.json_path} cannot be read ({exc}), so a resume "
                f"cannot check the settings they were made with; {again}"
            ) from None
        stored = stored.get("settings") if isinstance(stored, dict) else None
        if not isinstance(stored, dict):
            raise ResultsError(f"{self.json_path} records no settings for the {rows} rows of {self.path}; {again}")
        if stored != self.settings:
            diff = sorted(k for k in set(stored) | set(self.settings) if stored.get(k) != self.settings.get(k))
            raise ResultsError(
                f"{self.path} was written with other settings ({', '.join(diff)} differ); "
                "use another --out, or --overwrite to start again"
            )

    def _repair(self, raw: bytes, good_end: int, has_header: bool) -> None:
        self.repaired_bytes = len(raw) - good_end
        if self.repaired_bytes or not has_header:
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                if not has_header:  # empty file or header cut short
                    fh.seek(0)
                    fh.write((self.header + "\n").encode())
                fh.flush()
                os.fsync(fh.fileno())

    def discard(self) -> bool:
        """Remove the log, summary and plot if this object created them and no row was written (a run
        that failed before its first image leaves nothing behind); True if removed."""
        if not self.created or self.rows:
            return False
        for f in (self.path, self.json_path, self.png_path):
            try:
                f.unlink()
            except FileNotFoundError:
                pass
        return True

    @property
    def done(self) -> set[int]:
        return set(self.rows)

    # -- writing ----------------------------------------------------------------------------------
    def append(self, idx: int, label: int, predict: int, radius: float, seconds: float, samples: int | None = None) -> None:
        """Write one image's row (``samples``: required by, and only by, a log of adaptive sampling)."""
        if (samples is None) != (self.header == HEADER):
            raise ValueError(f"{self.path}: samples must be given exactly for logs of adaptive sampling")
        correct = int(predict == label)
        row = (int(idx), int(label), int(predict), float(radius), correct, float(seconds))
        if samples is not None:
            row += (int(samples),)
        with open(self.path, "a") as fh:
            fh.write(_format_row(row))
            fh.flush()
            os.fsync(fh.fileno())
        self.rows[row[0]] = (*row[:3], _radius_down(row[3]), row[4], float(f"{row[5]:.4f}"), *row[6:])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, radius, labels, seconds) of the logged images, in idx order."""
        rows = [self.rows[k] for k in sorted(self.rows)]
        pred = np.array([r[2] for r in rows], dtype=np.int64)
        rad = np.array([r[3] for r in rows], dtype=np.float64)
        lab = np.array([r[1] for r in rows], dtype=np.int64)
        sec = np.array([r[5] for r in rows], dtype=np.float64)
        return pred, rad, lab, sec

    def samples(self) -> np.ndarray | None:
        """Samples drawn per logged image (idx order): the log's column, or n0 + n of fixed sampling's settings;
        None when the settings do not say."""
        if self.header == HEADER_SAMPLES:
            return np.array([self.rows[k][6] for k in sorted(self.rows)], dtype=np.int64)
        n0, n = self.settings.get("n0"), self.settings.get("n")
        if isinstance(n0, int) and isinstance(n, int):
            return np.full(len(self.rows), n0 + n, dtype=np.int64)
        return None

    def summary(self, radii=metrics.DEFAULT_RADII, extra: dict | None = None) -> dict:
        """The log's JSON summary; certified accuracy at ``radii``, or, for adaptive decision mode, at its grid."""
        if self.settings.get("mode") == "decision" and isinstance(self.settings.get("radii"), list):
            radii = self.settings["radii"]
        pred, rad, lab, sec = self.arrays()
        out = {"schema_version": SCHEMA_VERSION, "settings": self.settings, "images": int(pred.size)}
        if self.trace is not None:
            out["trace"] = self.trace
        if pred.size:
            out.update(metrics.summary(pred, rad, lab, radii))
            out["seconds_total"] = float(sec.sum())
            out["seconds_per_image"] = float(sec.mean())
            samples = self.samples()
            if samples is not None:
                out["samples_total"] = int(samples.sum())
                out["samples_per_image"] = float(samples.mean())
        if extra:
            out.update(extra)
        return out

    def write_summary(self, extra: dict | None = None) -> dict:
        summ = self.summary(extra=extra)
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(summ, indent=2) + "\n")
        publish(tmp, self.json_path)
        return summ

    def plot(self, title: str | None = None) -> Path | None:
        """Certified accuracy against radius, as a PNG beside the log (:func:`engine.plots.plot_certified_accuracy`;
        ``title``: default from the settings, :func:`engine.plots.title_for`)."""
        from .plots import Run, plot_certified_accuracy, title_for

        pred, rad, lab, _ = self.arrays()
        if pred.size == 0:
            return None
        s = self.settings
        label = f"sigma={s['sigma']:g}" if isinstance(s.get("sigma"), (int, float)) else self.path.stem
        run = Run(label=label, prediction=pred, radius=rad, labels=lab, settings=s)
        return plot_certified_accuracy([run], self.png_path, title=title or title_for(s, int(pred.size)))


# ----------------------------------------------------------------------------------------------
# shards
# ----------------------------------------------------------------------------------------------


def read_log(path: str | os.PathLike) -> tuple[dict, dict[int, tuple]]:
    """(summary JSON, rows by idx) of a results log, read without changing anything.

    A line cut by a crash at the very end is ignored (``ResultsLog`` repairs it on resume); any
    other damage, a missing header or a missing summary raises :class:`ResultsError`; the rows pass
    :func:`validate_rows` against the selection the summary's settings record.
    """
    path = Path(path)
    json_path, _ = summary_paths(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such results log")
    try:
        summary = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise ResultsError(f"{path}: cannot read its summary {json_path} ({exc})") from exc
    if not isinstance(summary, dict) or not isinstance(summary.get("settings"), dict):
        raise ResultsError(f"{json_path}: not a results summary (no settings)")
    raw = path.read_bytes()
    header = header_for(summary["settings"])
    rows, _, has_header = _split_rows(raw, path, header)
    if not has_header:
        raise ResultsError(f"{path}: first line is not the header {header!r}")
    return summary, validate_rows(rows, path, settings=summary["settings"])


def merge_logs(paths, out: str | os.PathLike, *, allow_partial: bool = False, overwrite: bool = False,
               labels=None) -> dict:
    """Merge the logs of ``certify --shard K --num-shards N`` runs into one log with its summary and plot.

    The shards must come from one run (identical settings apart from ``shard``), each shard exactly
    once, with no image twice, and, unless ``allow_partial``, each shard finished (as many rows as it
    planned). ``labels`` (the data set's labels, indexable by idx), when given, must be the rows' labels (the
    check resume makes, :func:`validate_rows`). ``out`` gets the rows in idx order, a JSON summary and a PNG;
    returns the summary.
    """
    paths = [Path(p) for p in paths]
    out = Path(out)
    if not paths:
        raise ResultsError("nothing to merge: give the shard logs")
    written = {f.resolve() for f in (out, *summary_paths(out))}
    for p in paths:
        clash = written & {f.resolve() for f in (p, *summary_paths(p))}
        if clash:
            raise ResultsError(f"--out {out} would overwrite {sorted(map(str, clash))[0]}, a file of the input {p}")
    if out.exists() and not overwrite:
        raise ResultsError(f"{out} exists; use --overwrite to replace it")
    from .fileio import ExclusiveLock

    locks = []
    try:  # a log still being written is not merged (each file locked once: one given twice is reported below)
        seen = set()
        for p in paths:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                locks.append(ExclusiveLock(p).acquire())
        logs = [(p, *read_log(p)) for p in paths]
        if labels is not None:
            expected = {i: int(v) for i, v in enumerate(labels)}
            for p, summary, rows in logs:
                validate_rows([(0, r) for r in rows.values()], p, expected=expected)
    finally:
        for lock in locks:
            lock.release()
    for p, summary, _ in logs:
        shard = summary["settings"].get("shard", 0)
        if isinstance(shard, bool) or not isinstance(shard, int):
            what = "an already merged log" if shard == "merged" else f"a log with shard {shard!r}"
            raise ResultsError(f"{p} is {what}: merge the shard logs themselves")
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
    first_trace = logs[0][1].get("trace") if isinstance(logs[0][1].get("trace"), dict) else {}
    kept = {k: v for k, v in first_trace.items() if k not in ("written", "cpu", "cpu_kind", "threads")}
    trace = run_trace(**{**kept, "command": "merge", "merged_from": [str(p) for p in paths],
                         "shard_traces": [s.get("trace") for _, s, _ in logs]})
    planned = [s.get("planned_images") for _, s, _ in logs]
    extra = {"planned_images": sum(planned)} if all(x is not None for x in planned) and not missing else {}
    return write_log(out, settings, merged, sorted(merged), trace=trace, extra=extra)


def write_log(out: str | os.PathLike, settings: dict, rows: dict[int, tuple], order, *, trace: dict | None = None,
              extra: dict | None = None, title: str | None = None) -> dict:
    """Write the complete log ``out`` of ``rows`` (idx -> row as :func:`read_log` gives it) in ``order``, with its
    summary and plot, replacing what is there; returns the summary.

    The settings go first (the JSON), then the rows in one step (a temporary file renamed over ``out``), then the
    summary and plot: a crash leaves the old log or the new one, never a mix, and a log never without its settings.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = summary_paths(out)
    if png_path.exists():
        png_path.unlink()
    tmp = json_path.with_name(json_path.name + ".tmp")  # the settings first, then the rows they belong to
    tmp.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "settings": json.loads(json.dumps(settings))}) + "\n")
    publish(tmp, json_path)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(header_for(settings) + "\n")
        fh.writelines(_format_row(rows[idx]) for idx in order)
    publish(tmp, out)
    log = ResultsLog(out, settings, trace=trace)
    summary = log.write_summary(extra=extra)
    log.plot(title=title)
    return summary
