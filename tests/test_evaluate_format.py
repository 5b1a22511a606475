"""The markdown renderer of poison evaluations: clean and poisoned victims side by side."""

import pytest

from engine.evaluate import format_rows


def _row(victim="gaussian", arch="lenet", sigma=0.5, poisoned=False, method=None, acr=1.0, other=0.99, images=500):
    ca = {"0": acr / 2, "0.5": acr / 3, "1": acr / 4, "1.5": acr / 5}
    return {
        "victim_method": victim,
        "arch": arch,
        "sigma": sigma,
        "target_class": 8,
        "images": images,
        "n": 100_000,
        "poisoned": poisoned,
        "poison_method": method,
        "acr": acr,
        "certified_accuracy": ca,
        "clean_accuracy_other_classes": other,
    }


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_pairs_clean_and_poisoned_on_one_line():
    rows = [
        _row(acr=1.2),
        _row(poisoned=True, method="gaussian", acr=0.6, other=0.98),
        _row(victim="macer", sigma=0.75, acr=0.9),
        _row(victim="macer", sigma=0.75, poisoned=True, method="macer", acr=0.45),
    ]
    lines = format_rows(rows).splitlines()
    head = _cells(lines[0])
    assert len(lines) == 2 + 2  # header, rule, one line per (clean, poisoned) pair
    assert all(len(_cells(line)) == len(head) for line in lines[2:])
    first = dict(zip(head, _cells(lines[2])))
    assert first["victim"] == "gaussian" and first["sigma"] == "0.5" and first["poison"] == "gaussian"
    assert first["ACR clean"] == "1.2000" and first["ACR poisoned"] == "0.6000" and first["ACR drop"] == "50.0%"
    assert first["cert. acc clean r=0 / 0.5 / 1.0 / 1.5"] == "0.600 / 0.400 / 0.300 / 0.240"
    assert first["cert. acc poisoned r=0 / 0.5 / 1.0 / 1.5"] == "0.300 / 0.200 / 0.150 / 0.120"
    assert first["clean acc other classes: clean / poisoned"] == "0.9900 / 0.9800"
    second = dict(zip(head, _cells(lines[3])))
    assert second["victim"] == "macer" and second["sigma"] == "0.75" and second["ACR drop"] == "50.0%"


def test_one_clean_victim_against_several_poisons_and_missing_sides():
    rows = [
        _row(poisoned=True, method="macer", acr=0.5),  # listed before its clean counterpart
        _row(acr=1.0),
        _row(poisoned=True, method="smoothadv", acr=0.75),
        _row(arch="mlp", acr=0.8),  # clean only
        _row(arch="resnet20", poisoned=True, method="gaussian", acr=0.3),  # poisoned only
        _row(poisoned=True, method="gaussian", acr=0.9, images=100),  # other settings: not paired
    ]
    lines = format_rows(rows).splitlines()[2:]
    head = _cells(format_rows(rows).splitlines()[0])
    got = [dict(zip(head, _cells(line))) for line in lines]
    assert [(g["arch"], g["poison"], g["ACR clean"], g["ACR poisoned"], g["ACR drop"]) for g in got] == [
        ("lenet", "macer", "1.0000", "0.5000", "50.0%"),
        ("lenet", "smoothadv", "1.0000", "0.7500", "25.0%"),
        ("mlp", "-", "0.8000", "-", "-"),
        ("resnet20", "gaussian", "-", "0.3000", "-"),
        ("lenet", "gaussian", "-", "0.9000", "-"),
    ]
    assert got[3]["clean acc other classes: clean / poisoned"] == "- / 0.9900"


def test_no_drop_for_a_zero_clean_acr():
    lines = format_rows([_row(acr=0.0), _row(poisoned=True, method="gaussian", acr=0.0)]).splitlines()
    head = _cells(lines[0])
    row = dict(zip(head, _cells(lines[2])))
    assert row["ACR clean"] == "0.0000" and row["ACR drop"] == "-"


def test_two_clean_results_for_one_victim_are_an_error():
    with pytest.raises(ValueError, match="two clean results"):
        format_rows([_row(), _row(acr=2.0)])


def _log(path, rows):
    from engine.results import ResultsLog

    log = ResultsLog(path, {"test": 1})
    for idx, (label, pred, radius) in rows.items():
        log.append(idx, label, pred, radius, 0.1)
    log.write_summary()
    return path


def test_acr_drop_interval_paired_bootstrap(tmp_path):
    """Point estimate = the ACR drop over the pairs (wrong predictions count 0); the interval is a paired
    bootstrap: it holds the point, is narrow when every image drops by the same fraction and wide when the
    drop sits on a few images; numpy's percentile of a direct resample loop gives the same bounds."""
    import numpy as np

    from engine.evaluate import acr_drop_interval

    rng = np.random.default_rng(5)
    n = 60
    base = rng.uniform(0.5, 2.0, n)
    clean = _log(tmp_path / "c.tsv", {i: (8, 8, float(base[i])) for i in range(n)})
    # every image loses 30%: any resample has drop 0.3 exactly
    even = _log(tmp_path / "e.tsv", {i: (8, 8, float(0.7 * base[i])) for i in range(n)})
    d, lo, hi = acr_drop_interval(clean, even, reps=500)
    assert d == pytest.approx(0.3) and lo == pytest.approx(0.3) and hi == pytest.approx(0.3)
    # the drop on 6 images only (one of them now misclassified), same overall size order: a wide interval
    lumpy_rows = {i: (8, 8, float(base[i])) for i in range(n)}
    for i in range(6):
        lumpy_rows[i] = (8, 3 if i == 0 else 8, 0.0 if i else 1.7)
    lumpy = _log(tmp_path / "l.tsv", lumpy_rows)
    d2, lo2, hi2 = acr_drop_interval(clean, lumpy, reps=4000, seed=1)
    r_c = base.copy()
    r_p = base.copy()
    r_p[:6] = 0.0  # index 0 is wrong (radius counts 0), 1-5 have radius 0
    assert d2 == pytest.approx(1 - r_p.sum() / r_c.sum())
    assert lo2 < d2 < hi2 and hi2 - lo2 > 0.05
    pick = np.random.default_rng(1).integers(0, n, size=(4000, n))
    ref = np.percentile(1 - r_p[pick].sum(1) / r_c[pick].sum(1), [2.5, 97.5])
    assert (lo2, hi2) == pytest.approx(tuple(ref))
    # logs of different images are refused, naming the files
    other = _log(tmp_path / "o.tsv", {i + 1: (8, 8, 1.0) for i in range(n)})
    with pytest.raises(ValueError, match=r"different images: 1 only in .*c\.tsv"):
        acr_drop_interval(clean, other)
    with pytest.raises(ValueError, match="level must be in"):
        acr_drop_interval(clean, even, level=95)


def _victim_dir(tmp_path, name, radii, poisoned, first=0):
    import json

    import numpy as np

    d = tmp_path / name
    d.mkdir()
    _log(d / "certify.tsv", {first + i: (8, 8, float(r)) for i, r in enumerate(radii)})
    (d / "summary.json").write_text(json.dumps({"acr": float(np.mean(radii)), "poisoned": poisoned, "images": len(radii),
                                                "n": 1000}))
    return d


def test_pair_evaluations(tmp_path):
    """engine.evaluate.pair_evaluations: each pair's ACRs from summary.json, the drop and the paired interval of
    acr_drop_interval on the two certify.tsv; a directory without summary.json, swapped clean / poisoned sides,
    a summary that does not say whether it was poisoned and logs of different images are errors naming what is wrong."""
    import json

    import numpy as np

    from engine.evaluate import acr_drop_interval, pair_evaluations

    rng = np.random.default_rng(11)
    base = rng.uniform(0.2, 2.0, 40)
    clean = _victim_dir(tmp_path, "clean", base, False)
    bad = _victim_dir(tmp_path, "bad", base * rng.uniform(0.3, 0.9, 40), True)
    r = pair_evaluations(clean, bad)
    d, lo, hi = acr_drop_interval(clean / "certify.tsv", bad / "certify.tsv")
    assert r["acr_drop"] == pytest.approx(d) and r["acr_drop_interval_95"] == pytest.approx([lo, hi])
    assert r["acr_clean"] == pytest.approx(base.mean()) and lo < d < hi
    assert r["clean_dir"] == str(clean) and r["poisoned"]["poisoned"] is True
    empty = tmp_path / "empty"
    empty.mkdir()
    other = _victim_dir(tmp_path, "other", base, True, first=1)
    vague = _victim_dir(tmp_path, "vague", base, True)
    summary = json.loads((vague / "summary.json").read_text())
    del summary["poisoned"]
    (vague / "summary.json").write_text(json.dumps(summary))
    broken = _victim_dir(tmp_path, "broken", base, True)
    (broken / "summary.json").write_text("{not json")
    no_acr = _victim_dir(tmp_path, "no_acr", base, True)
    (no_acr / "summary.json").write_text(json.dumps({"poisoned": True, "images": 40}))
    for pair, msg in (((empty, bad), "holds no summary.json"), ((bad, clean), "expected a clean victim"),
                      ((clean, vague), "vague/summary.json does not say whether"),
                      ((vague, bad), "vague/summary.json does not say whether"),
                      ((clean, broken), "broken/summary.json is not valid JSON"),
                      ((clean, no_acr), "no_acr/summary.json holds no numeric 'acr'"),
                      ((clean, other), "different images")):
        with pytest.raises(ValueError, match=msg):
            pair_evaluations(*pair)


def test_drop_difference_interval_against_a_control(tmp_path):
    """poison minus control = (sum r_control - sum r_poisoned) / sum r_clean over paired images; the interval holds
    it, is a point when every image moves by the same fraction, and the same logs give 0; other images are refused."""
    import numpy as np

    from engine.evaluate import drop_difference_interval, format_control_differences

    rng = np.random.default_rng(3)
    n = 50
    base = rng.uniform(0.5, 2.0, n)
    clean = _log(tmp_path / "c.tsv", {i: (8, 8, float(base[i])) for i in range(n)})
    poison = _log(tmp_path / "p.tsv", {i: (8, 8, float(0.5 * base[i])) for i in range(n)})
    control = _log(tmp_path / "k.tsv", {i: (8, 8, float(0.8 * base[i])) for i in range(n)})
    d, lo, hi = drop_difference_interval(clean, poison, control, reps=400)
    assert d == pytest.approx(0.3) and lo == pytest.approx(0.3) and hi == pytest.approx(0.3)
    d, lo, hi = drop_difference_interval(clean, poison, poison, reps=400)
    assert d == 0 and lo == 0 and hi == 0
    uneven = _log(tmp_path / "u.tsv", {i: (8, 8 if i % 5 else 3, float(base[i])) for i in range(n)})  # 10 wrong
    d, lo, hi = drop_difference_interval(clean, poison, uneven, reps=2000)
    wrong = sum(base[i] for i in range(n) if i % 5 == 0)
    assert d == pytest.approx((base.sum() - wrong - 0.5 * base.sum()) / base.sum())
    assert lo < d < hi
    other = _log(tmp_path / "o.tsv", {i: (8, 8, 1.0) for i in range(1, n + 1)})
    with pytest.raises(ValueError, match="other images"):
        drop_difference_interval(clean, poison, other)
    table = format_control_differences([{"control": "twin", "drop_poisoned": 0.5, "drop_control": 0.2,
                                         "drop_minus_control": 0.3, "drop_minus_control_ci95": [0.25, 0.35],
                                         "clean_acc_target_poisoned": 0.8, "clean_acc_target_control": 0.7}])
    assert "| twin | 50.0% | 20.0% | 30.0% | [25.0%, 35.0%] | 0.800 / 0.700 |" in table
