"""bench/gpu_check.py's logic on the CPU: its dry run (CUDA stages skipped with a reason, the CPU stages at tiny
sizes), the output folder's file rule, the per-stage limits and budget, a stage killed at its limit while the later
stages still run, the targets' met / not met, and the shell wrapper's syntax."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run with a test-only first stage that sleeps 60 s under a 1 s limit."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, OUT=str(out))
    cmd = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--inject-sleep", "60",
           "--stage-limit", "sleep=1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (out / "timings.json").read_text()
    return out, json.loads(text, parse_constant=lambda c: pytest.fail(f"timings.json has {c}: not strict JSON")), proc.stdout


def test_dry_run_files_and_stages(dry_run):
    out, doc, _ = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= gpu_check.MAX_FILES and set(files) <= set(gpu_check.FILES), files
    assert {"env.txt", "build.log", "tests-gpu.log", "stages.log", "timings.json"} == set(files)
    assert doc["files"] == files and doc["dry_run"] is True
    stages = {s["name"]: s for s in doc["stages"]}
    assert [s["name"] for s in doc["stages"]] == ["sleep", *gpu_check.STAGES]
    for s in doc["stages"]:
        assert s["status"] in ("ok", "failed", "timeout", "skipped") and "reason" in s and "seconds" in s
        assert s["limit_s"] > 0 and isinstance(s["targets"], list)
    for name in gpu_check.CUDA_ONLY:  # skipped, saying why
        assert stages[name]["status"] == "skipped" and "needs CUDA" in stages[name]["reason"]
    for name in ("hvp", "pacd_step"):  # the CPU stages ran (tiny), with numbers and targets that do not apply here
        assert stages[name]["status"] == "ok", stages[name]
        assert stages[name]["numbers"] and all(t["met"] is None for t in stages[name]["targets"])
    assert stages["pacd_step"]["numbers"]["projected_full_run_s"] > 0
    assert stages["hvp"]["numbers"]["lenet"]["ms_hv"]["torch_func"] > 0


def test_stage_over_its_limit_is_a_timeout_and_the_rest_run(dry_run):
    _, doc, stdout = dry_run
    sleep = doc["stages"][0]
    assert sleep["name"] == "sleep" and sleep["status"] == "timeout" and "limit of 1 s" in sleep["reason"]
    assert sleep["seconds"] < 30  # killed, not waited for
    assert [s["status"] for s in doc["stages"][1:] if s["name"] in ("hvp", "pacd_step")] == ["ok", "ok"]
    assert "timeout" in stdout


def test_limits_within_budget(dry_run):
    _, doc, _ = dry_run
    assert set(gpu_check.LIMITS_S) == set(gpu_check.STAGES)
    assert sum(gpu_check.LIMITS_S.values()) <= gpu_check.BUDGET_S <= 7.5 * 60
    assert doc["stage_limits_s"] == gpu_check.LIMITS_S  # the injected test stage is not part of the budget
    assert doc["stage_limits_sum_s"] <= doc["budget_s"] and doc["within_budget"] is True


def test_targets_met_from_the_measurement():
    good = {"engine_s_per_image": 0.15, "speedup_vs_plain": 12.0}
    assert [t["met"] for t in gpu_check.evaluate_targets("certify_resnet110", good, True)] == [True, True]
    bad = {"engine_s_per_image": 0.25, "speedup_vs_plain": 9.0}
    assert [t["met"] for t in gpu_check.evaluate_targets("certify_resnet110", bad, True)] == [False, False]
    assert [t["met"] for t in gpu_check.evaluate_targets("certify_resnet110", good, False)] == [None, None]
    hvp = gpu_check.evaluate_targets("hvp", {"lenet": {"speedup_hv": 2.5}, "resnet20seq": {"speedup_hv": None}}, True)
    assert [t["met"] for t in hvp] == [True, None]
    pacd = gpu_check.evaluate_targets("pacd_step", {"projected_full_run_s": 2750 * 0.2}, True)
    assert pacd[0]["met"] is True and pacd[0]["bound"] == "<= 600"
    assert gpu_check.evaluate_targets("lenet_fused", {"speedup": 2.9}, True)[0]["met"] is False


def test_stage_limit_option():
    assert gpu_check.parse_limits(["hvp=3"])["hvp"] == 3.0
    with pytest.raises(SystemExit):
        gpu_check.parse_limits(["nosuchstage=3"])


def test_shell_wrapper_syntax():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], check=True)


def test_failing_stage_is_reported_with_its_error(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path), "--dry-run", "--only", "none",
           "--inject-sleep", "-1"]  # fmt: skip  (time.sleep(-1) raises)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "timings.json").read_text())
    sleep, *rest = doc["stages"]
    assert sleep["status"] == "failed" and "ValueError" in sleep["reason"], sleep
    assert all(s["status"] == "skipped" and s["reason"] for s in rest)
