#!/usr/bin/env bash
# The study's remaining work on a 2-core machine, resumable. One process crafts: GA eps 0.1, SmoothAdv (the eps 0.1
# rows first), then GA eps 0.03 and 0.05 (each whether or not the one before failed: a poison another process holds is
# skipped), makes any twin still missing, then trains and certifies victims too. The other trains and certifies
# victims (the MACER, GA, then SmoothAdv rows; each pass first makes the twins whose crafted poison exists; a row whose
# poison is not crafted yet waits), sleeping 10 minutes between passes while the first process runs, then passes once
# more after it. A victim one process has (the lock on its folder) is skipped by the other.
# A second copy started while one runs exits at once (lock file). Run it again in a new session: finished work is
# skipped and every run resumes from its checkpoint. Logs: $WORK/{craft,victims}-<time>.log.
#   setsid nohup bench/experiments/pacd_controls/run_both_cores.sh > /dev/null 2>&1 < /dev/null &
# Environment (for tests): WORK (default runs/pacd_controls), PYTHON (.venv/bin/python), PASS_SECONDS (600); relative
# paths are taken from the repository's root.
set -u
cd "$(dirname "$0")/../../.."
WORK=${WORK:-runs/pacd_controls}
PY=${PYTHON:-.venv/bin/python}
PASS_SECONDS=${PASS_SECONDS:-600}
if ! [[ $PASS_SECONDS =~ ^[0-9]+$ ]]; then
  echo "PASS_SECONDS must be a whole number of seconds, got '$PASS_SECONDS'" >&2
  exit 2
fi
mkdir -p "$WORK"
exec 9> "$WORK/run_both_cores.lock"
flock -n 9 || { echo "run_both_cores.sh already runs ($WORK/run_both_cores.lock)" >&2; exit 1; }
D=(bench/experiments/pacd_controls/pacd_controls.py --data-root ../shared/data/mnist --work "$WORK" --threads 1)
t=$(date +%s)
victims() {
  for proc in macer gaussian smoothadv; do "$PY" "${D[@]}" --stage victims --only "$proc"; done
}
( "$PY" "${D[@]}" --stage craft --only gaussian --eps 0.1; "$PY" "${D[@]}" --stage craft --only smoothadv
  "$PY" "${D[@]}" --stage craft --only gaussian; "$PY" "${D[@]}" --stage controls; victims
) > "$WORK/craft-$t.log" 2>&1 &
crafter=$!
( while kill -0 "$crafter" 2> /dev/null; do victims; sleep "$PASS_SECONDS"; done; victims
) > "$WORK/victims-$t.log" 2>&1 &
wait
