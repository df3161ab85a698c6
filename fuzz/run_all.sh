#!/usr/bin/env bash
# Run the atheris targets one after the other, each for RUNS inputs (default 1000000).
#   fuzz/run_all.sh [RUNS] [TARGET ...]      e.g.  fuzz/run_all.sh 100000 sniff chunk
# Corpora grow in fuzz/corpus/<target>/, crash inputs land in fuzz/crashes/<target>-*, logs
# in fuzz/logs/<target>.log; one line per target is appended to fuzz/logs/summary.txt.
# Needs atheris (pip install atheris) and kite importable (src/ is put on PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")"
RUNS=${1:-1000000}
shift $(( $# > 0 ? 1 : 0 ))
export PYTHONPATH="$PWD/../src${PYTHONPATH:+:$PYTHONPATH}"
if [ $# -gt 0 ]; then
  targets=("$@")
else
  targets=()
  for f in fuzz_*.py; do t=${f#fuzz_}; targets+=("${t%.py}"); done
fi
mkdir -p corpus crashes logs
python seeds.py corpus
status=0
for t in "${targets[@]}"; do
  start=$(date +%s)
  python "fuzz_$t.py" "corpus/$t" -runs="$RUNS" -max_len=4096 -timeout=20 -rss_limit_mb=4096 \
    -artifact_prefix="crashes/$t-" -print_final_stats=1 >"logs/$t.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  done_runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' | tail -1)
  crashes=$(find crashes -name "$t-*" -newermt "@$start" 2>/dev/null | wc -l)
  line="$(date -u +%FT%TZ) $t runs=${done_runs:-?} seconds=$secs exit=$rc new_crashes=$crashes"
  echo "$line" | tee -a logs/summary.txt
  [ "$rc" -ne 0 ] && status=1
done
exit $status
