#!/usr/bin/env bash
# The study's remaining work on a 2-core machine, resumable. First the crafting, each poison data-parallel on both
# cores (torchrun, two one-thread ranks): MACER, SmoothAdv, GA eps 0.1, then GA eps 0.03 and 0.05 (each whether or not
# the one before failed; a poison another process holds is skipped). A finished poison is copied to results/kept
# (tracked: commit it); a crafting checkpoint lives in the untracked work folder, and every stage's start (and
# --stage status) keeps its compact copy in results/kept too (commit it before the session ends: a new checkout
# resumes from it). Then the controls (twins included), then two processes
# train and certify the victims (the MACER, GA, then SmoothAdv rows; a victim one process has, the lock on its folder,
# is skipped by the other), and one of them passes once more at the end. Victims start only after the crafting: a row
# pairs victims of one CPU kind, and crafting is the same work on any kind. The exit status is 1 if any step failed
# (the steps after it still run).
# A second copy started while one runs exits at once (lock file). Run it again in a new session: finished work is
# skipped and every run resumes from its checkpoint. Logs: $WORK/craft-<time>.log, $WORK/victims-{a,b}-<time>.log.
#   setsid nohup bench/experiments/pacd_controls/run_both_cores.sh > /dev/null 2>&1 < /dev/null &
# Environment (for tests): WORK (default runs/pacd_controls), PYTHON (.venv/bin/python); relative paths are taken
# from the repository's root.
set -u
cd "$(dirname "$0")/../../.."
WORK=${WORK:-runs/pacd_controls}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$WORK"
exec 9> "$WORK/run_both_cores.lock"
flock -n 9 || { echo "run_both_cores.sh already runs ($WORK/run_both_cores.lock)" >&2; exit 1; }
D=(bench/experiments/pacd_controls/pacd_controls.py --data-root ../shared/data/mnist --work "$WORK" --threads 1)
t=$(date +%s)
status=0
craft() {
  "$PY" -m torch.distributed.run --standalone --nproc-per-node=2 "${D[@]}" --stage craft --only "$1" --eps "$2" \
    || status=1
}
victims() {
  local rc=0
  for proc in macer gaussian smoothadv; do "$PY" "${D[@]}" --stage victims --only "$proc" || rc=1; done
  return $rc
}
{ craft macer 0.1; craft smoothadv 0.1; craft gaussian 0.1; craft gaussian 0.03; craft gaussian 0.05
  "$PY" "${D[@]}" --stage controls || status=1
} > "$WORK/craft-$t.log" 2>&1
victims > "$WORK/victims-a-$t.log" 2>&1 &
a=$!
victims > "$WORK/victims-b-$t.log" 2>&1 &
b=$!
wait "$a" || status=1
wait "$b" || status=1
# a last pass: a victim that one process skipped because the other had it, and that the other did not finish
victims >> "$WORK/victims-a-$t.log" 2>&1 || status=1
exit $status
