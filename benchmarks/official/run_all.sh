#!/usr/bin/env bash
# Every official baseline and its harness counterpart, one after the other (each step is skipped when its JSON
# exists), then summary.md. Runs under nice 19 with one BLAS thread: it shares the machine.
#   bash benchmarks/official/run_all.sh            (from the repository root, comprune's Python on PATH or $PY)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
export PYTHONPATH=$PWD/src
R=benchmarks/results/official
step() { local name=$1; shift; [ -f "$R/$name.json" ] && { echo "skip $name"; return; }; nice -n 19 "$PY" "$@"; }
step llm-pruner          benchmarks/official/llm_pruner.py
step harness-llm-pruner  benchmarks/official/harness.py --method llm-pruner --ratio 0.21047
step flap                benchmarks/official/flap.py --method flap --nsamples 128
step harness-flap        benchmarks/official/harness.py --method flap --ratio 0.20056
step harness-flap-official-windows  benchmarks/official/harness.py --method flap --ratio 0.20056 --name flap-official-windows --official-windows flap
step wanda-sp            benchmarks/official/flap.py --method wanda-sp
step harness-wanda-sp    benchmarks/official/harness.py --method wanda-sp --ratio 0.19693
step harness-wanda-sp-official-windows  benchmarks/official/harness.py --method wanda-sp --ratio 0.19693 --name wanda-sp-official-windows --official-windows flap
step shortgpt            benchmarks/official/shortgpt.py --docs 32
step harness-layer-drop  benchmarks/official/harness.py --method layer-drop --ratio 0.2
"$PY" benchmarks/official/summary.py
