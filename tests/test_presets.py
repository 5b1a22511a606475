"""poison --preset paper-mnist: the reference implementation's settings per procedure, overrides recorded."""

import pytest

from engine import cli, data
from engine.pacd import PRESETS, PoisonSet, preset
from engine.presets import DEVIATIONS


def test_paper_mnist_holds_the_reference_settings():
    ga, macer, sa = (preset("paper-mnist", m) for m in ("gaussian", "macer", "smoothadv"))
    for p in (ga, macer, sa):  # common to the three scripts
        assert (p["eps"], p["lr_u"], p["lr_w"], p["damping"], p["k"], p["beta"]) == (0.1, 0.1, 1e-3, 1e-3, 20, 16.0)
        assert (p["batch_clean"], p["batch_poison"], p["batch_val"], p["niter2"], p["u_update"]) == (900, 100, 100, 10,
                                                                                                       "adam")
    assert (ga["sigma"], ga["lr_p"], ga["niter1"], ga["outer_steps"], ga["reset_every"], ga["a"]) == (
        0.5, 1e-2, 10, 2750, 10, 0.001)
    assert (macer["sigma"], macer["lr_p"], macer["method_args"]) == (0.75, 1e-4, {"k": 1, "beta": 16.0, "gamma": 8.0,
                                                                               "lbd": 1.0})
    assert (sa["sigma"], sa["lr_p"], sa["niter1"], sa["outer_steps"], sa["reset_every"], sa["a"]) == (
        0.75, 1e-3, 1, 5500, 20, 1e-4)
    assert sa["method_args"] == {"eps": 1.0, "steps": 2, "m": 1}
    ga["lr_p"] = 5  # a copy: the table is not changed
    assert preset("paper-mnist", "gaussian")["lr_p"] == 1e-2
    assert set(DEVIATIONS) == set(PRESETS) and all(DEVIATIONS.values())
    with pytest.raises(ValueError, match="unknown preset"):
        preset("paper-cifar", "gaussian")


def test_cli_preset_fills_options_and_records_overrides(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    argv = ["poison", "--preset", "paper-mnist", "--method", "macer", "--target-class", "8", "--outer-steps", "1",
            "--batch-clean", "16", "--batch-poison", "4", "--batch-val", "4", "--upper-k", "2", "--niter1", "1",
            "--niter2", "1", "--val-size", "100", "--device", "cpu", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    split = data.split_validation(*data.load_mnist(data.embedded_mnist_root(), "train"), 100)[0]
    s = PoisonSet.load(out, split).settings
    assert s["preset"] == "paper-mnist"
    assert s["preset_overrides"] == {"outer_steps": 1, "batch_clean": 16, "batch_poison": 4, "batch_val": 4, "k": 2,
                                     "niter1": 1, "niter2": 1}
    assert (s["sigma"], s["lr_p"], s["reset_every"], s["method_args"]["lbd"]) == (0.75, 1e-4, 10, 1.0)


def test_cli_without_preset_needs_sigma_eps_and_steps(tmp_path, capsys):
    assert cli.main(["poison", "--target-class", "8", "--sigma", "0.5", "--out", str(tmp_path / "p.safetensors")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --eps, --outer-steps are required (or --preset paper-mnist)"]
