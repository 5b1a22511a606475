#!/usr/bin/env bash
# The study's remaining work on a 2-core machine, resumable: one process crafts (GA eps 0.1, 0.03, 0.05, then
# SmoothAdv; a poison another process holds is skipped), the other trains and certifies victims (MACER, GA, SmoothAdv
# rows; a row whose poison is not crafted yet waits). Run it again in every session: finished work is skipped, and
# every run resumes from its checkpoint. Logs: runs/pacd_controls/*.log. Usage (from the repository root):
#   setsid nohup bench/experiments/pacd_controls/run_both_cores.sh > /dev/null 2>&1 < /dev/null &
set -u
cd "$(dirname "$0")/../../.."
D="bench/experiments/pacd_controls/pacd_controls.py --data-root ../shared/data/mnist --threads 1"
PY=${PYTHON:-.venv/bin/python}
mkdir -p runs/pacd_controls
t=$(date +%s)
( $PY $D --stage craft --only gaussian && $PY $D --stage craft --only smoothadv
  $PY $D --stage controls ) > "runs/pacd_controls/craft-$t.log" 2>&1 &
( for proc in macer gaussian smoothadv; do $PY $D --stage victims --only "$proc" || exit 1; done
) > "runs/pacd_controls/victims-$t.log" 2>&1 &
wait
