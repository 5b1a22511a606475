#!/usr/bin/env bash
# The study's remaining work on a 2-core machine, resumable. One process crafts: GA eps 0.1, 0.03, 0.05, then
# SmoothAdv (each whether or not the one before failed: a poison another process holds is skipped), then the twins.
# The other trains and certifies victims (the MACER, GA, then SmoothAdv rows; a row whose poison is not crafted yet
# waits) and passes over the rows again every 10 minutes while the crafting goes on, then once more after it.
# A second copy started while one runs exits at once (lock file). Run it again in a new session: finished work is
# skipped and every run resumes from its checkpoint. Logs: runs/pacd_controls/{craft,victims}-<time>.log.
#   setsid nohup bench/experiments/pacd_controls/run_both_cores.sh > /dev/null 2>&1 < /dev/null &
set -u
cd "$(dirname "$0")/../../.."
mkdir -p runs/pacd_controls
exec 9> runs/pacd_controls/run_both_cores.lock
flock -n 9 || { echo "run_both_cores.sh already runs (runs/pacd_controls/run_both_cores.lock)" >&2; exit 1; }
D="bench/experiments/pacd_controls/pacd_controls.py --data-root ../shared/data/mnist --threads 1"
PY=${PYTHON:-.venv/bin/python}
t=$(date +%s)
victims() {
  for proc in macer gaussian smoothadv; do $PY $D --stage victims --only "$proc"; done
}
( $PY $D --stage craft --only gaussian; $PY $D --stage craft --only smoothadv; $PY $D --stage controls
) > "runs/pacd_controls/craft-$t.log" 2>&1 &
crafter=$!
( while kill -0 "$crafter" 2> /dev/null; do victims; sleep 600; done; victims
) > "runs/pacd_controls/victims-$t.log" 2>&1 &
wait
