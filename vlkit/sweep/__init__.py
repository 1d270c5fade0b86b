"""``vlkit sweep``: train a grid of recipe overrides x seeds, resumably, then tabulate and plot the results.

A sweep file names a base recipe and the cells to compare::

    recipe: ../recipes/demo/clip_mlp.yaml     # relative to this file
    grid:                                     # cartesian product of dotted overrides ...
      model.fusion.name: [mlp, token_concat]
      stages.0.lr: [1.0e-3, 3.0e-4]
    # cells:                                  # ... or an explicit list (each optionally named)
    #   - {name: mlp, model.fusion.name: mlp}
    #   - {name: linear, model.fusion: {name: linear}}
    seeds: [0, 1, 2]                          # one run per cell and seed (`seed=` override)
    overrides: {eval.max_samples: 200}        # applied to every cell, before the cell's own
    metrics: [val/accuracy, val/loss]         # default: val/accuracy and every per-type accuracy
    rank_by: val/accuracy                     # default: the first metric; ranks cells in results.md, plotted
    eval:                                     # optional: `vlkit eval` (lmms-eval) on every finished run
      tasks: [vqav2_val]
      limit: 200                              # samples per task (fraction when < 1); default: all
      include_path: tasks/                    # local task YAMLs, relative to this file
    out: runs/fusions                         # default: runs/<sweep name>/ next to this file

Every run is ``vlkit fit`` in its own process, in ``<out>/<cell>/seed<k>/`` (a normal run folder), with
its output in ``<out>/<cell>/seed<k>.log``; with an ``eval:`` block, ``vlkit eval`` then writes the run's
lmms-eval scores into ``<run>/lmms/`` (``results.json``, plus ``sweep_eval.json``: the block it ran). Their
metrics are ``lmms/<task>/<metric>`` (``lmms/vqav2_val/exact_match``; a filter other than ``none`` is kept:
``lmms/gsm8k/exact_match,strict-match``), next to the run's ``val/...`` metrics. A run whose folder has
``summary.json`` (and the lmms-eval scores of this ``eval:`` block) is skipped, so a rerun after an
interruption trains or evaluates only what is missing (and ``vlkit fit`` resumes a half-finished run from its
last checkpoint). A failed run is recorded and the others go on. ``<out>/sweep.jsonl`` logs every attempt;
``results.csv`` (one row per run), ``results.md`` (mean ± std over seeds per cell, cells ranked by
``rank_by``) and ``results.png`` (bar chart of ``rank_by``) are rewritten at the end of every invocation.

The package: :mod:`vlkit.sweep.spec` (the sweep file, its cells and runs), :mod:`vlkit.sweep.runner`
(running and reusing runs, lmms-eval scoring) and :mod:`vlkit.sweep.report` (tables, CSV, plot, ranking);
``spec`` imports neither of the others, ``report`` imports ``spec``, ``runner`` imports both.
"""

from __future__ import annotations

from vlkit.sweep.report import rank_cells, write_reports
from vlkit.sweep.runner import SweepReport, collect_results, describe, lmms_metrics, run_sweep
from vlkit.sweep.spec import Cell, Run, RunResult, Sweep, SweepEval, SweepFile, format_value, load_sweep

__all__ = ["Cell", "Run", "RunResult", "Sweep", "SweepEval", "SweepFile", "SweepReport", "collect_results",
           "describe", "format_value", "lmms_metrics", "load_sweep", "rank_cells", "run_sweep", "write_reports"]
