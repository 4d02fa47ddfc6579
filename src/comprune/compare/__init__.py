"""comprune.compare: COMP and the baselines on one model, same calibration data, same evaluation.

runner.py holds the stages and their order (resumable), measure.py the prunes in their own processes and
the runtime floor, report.py the results table, markdown and plot; records.py the run files they share.

Every method x ratio is pruned in its own subprocess (`python -m comprune.cli prune ... --json`), so the
pruning time and peak RSS reported are that method's alone, and every prune gets the same calibration
source/seed (the manifests' calibration sha256 must agree; the comparison checks it). Evaluation runs here:

- WikiText-2 perplexity at 128 and 2048 tokens on a fixed slice (the first `ppl_max_tokens` tokens of the test
  stream) for every run; the full test set for the runs at `full_ratio` (and dense);
- the seven-task zero-shot average (`evaluate_zeroshot(..., "paper7", subset=200)`) at `zeroshot_ratio`;
- parameters, pruning seconds, pruning peak RSS (the pruning process's own, from wait4 through a small
  launcher: `run_with_peak_rss`); greedy generation tokens/s
  relative to the dense model (`evaluate.speed.relative_speed`, measured alternately with the dense model);
- for methods that stream (`comprune prune --stream`), a second prune from disk one block at a time in its own
  process: its seconds and peak RSS, and a check that its weights equal the in-memory prune's (sha256);
- once, the runtime floor: the peak RSS of a process that imports comprune and builds the model's skeleton
  without weights, which every pruning process pays before its own work.

Resumable: each run's results live in `<out>/runs/<method>-r<ratio>.json`, written after every metric; a rerun
skips what is there. Work is ordered so the most useful numbers come first: the `zeroshot_ratio` runs
(prune, slice perplexity, speed), the other ratios, the zero-shot scores, then the full-test-set perplexity.
`<out>/results.json`, `results.md` and `results.png` are rewritten after every step.
"""
from .records import DEFAULT_METHODS, DEFAULT_OUT, REDOABLE, STAGES, check_results_dir
from .runner import Comparison, compare

__all__ = ["Comparison", "compare", "check_results_dir", "DEFAULT_METHODS", "DEFAULT_OUT", "STAGES", "REDOABLE"]
