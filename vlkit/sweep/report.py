"""Sweep reports: ``results.csv``, ``results.md`` (mean ± std over seeds, cells ranked), ``results.png``."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from vlkit.sweep.spec import DEFAULT_METRIC, LMMS_PREFIX, Cell, RunResult, Sweep, format_value


def choose_metrics(sweep: Sweep, results: Sequence[RunResult]) -> list[str]:
    """The sweep's ``metrics`` (default: ``val/accuracy``, every per-type accuracy and every lmms-eval score
    found in the results), with ``rank_by`` first."""
    if sweep.metrics:
        metrics = list(sweep.metrics)
    else:
        found = sorted({k for r in results for k in r.metrics if k.startswith(DEFAULT_METRIC + "/")})
        lmms = sorted({k for r in results for k in r.metrics if k.startswith(LMMS_PREFIX)})
        metrics = [DEFAULT_METRIC, *found, *lmms]
    if sweep.rank_by:
        metrics = [sweep.rank_by, *(m for m in metrics if m != sweep.rank_by)]
    return metrics


def ranking_metric(sweep: Sweep, results: Sequence[RunResult]) -> str:
    """The metric that ranks the cells and is plotted: ``rank_by``, else the first reported metric."""
    return sweep.rank_by or choose_metrics(sweep, results)[0]


def lower_is_better(metric: str) -> bool:
    """Losses rank ascending; every other metric (accuracies, ANLS, CIDEr, lmms-eval scores) descending."""
    return metric.rsplit("/", 1)[-1].endswith("loss") or "/loss" in metric


def baseline_key(metric: str) -> str | None:
    """The majority-baseline key of a validation metric (``val/anls/color`` -> ``val/baseline_anls/color``;
    ``val/accuracy`` -> ``val/baseline``), as the ``lm`` objective reports them; None for other metrics."""
    from vlkit.eval.metrics import METRICS

    if metric.startswith(DEFAULT_METRIC):
        return "val/baseline" + metric.removeprefix(DEFAULT_METRIC)
    for name in METRICS:
        head = f"val/{name}"
        if metric == head or metric.startswith(head + "/"):
            return f"val/baseline_{name}" + metric.removeprefix(head)
    return None


def rank_cells(sweep: Sweep, results: Sequence[RunResult], metric: str) -> list[tuple[Cell, list[RunResult]]]:
    """Cells best first by the mean of ``metric`` over their finished seeds; cells without it last, in order."""
    def mean(rows: list[RunResult]) -> float | None:
        vals = [float(r.metrics[metric]) for r in rows if r.status == "ok" and metric in r.metrics]
        return sum(vals) / len(vals) if vals else None

    cells = _by_cell(sweep, results)
    scored = [(mean(rows), i) for i, (_, rows) in enumerate(cells)]
    sign = 1.0 if lower_is_better(metric) else -1.0
    order = sorted(range(len(cells)), key=lambda i: (scored[i][0] is None, sign * (scored[i][0] or 0.0), i))
    return [cells[i] for i in order]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def format_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"0.512 ± 0.031"`` (just the mean for one value, ``—`` for none)."""
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _by_cell(sweep: Sweep, results: Sequence[RunResult]) -> list[tuple[Cell, list[RunResult]]]:
    return [(cell, [r for r in results if r.run.cell is cell]) for cell in sweep.cells]


def write_csv(path: Path, results: Sequence[RunResult], metrics: Sequence[str]) -> None:
    """One row per run: cell, seed, status, reused, seconds, run_dir, overrides, error, metrics."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell", "seed", "status", "reused", "seconds", "run_dir", "overrides", "error", *metrics])
        for r in results:
            writer.writerow([r.run.cell.name, r.run.seed, r.status, r.reused,
                             "" if r.seconds is None else f"{r.seconds:.1f}", r.run.run_dir,
                             " ".join(r.run.cell.overrides), " ".join(r.error.split())[:1000],
                             *("" if m not in r.metrics else repr(float(r.metrics[m])) for m in metrics)])
    tmp.replace(path)


def write_markdown(path: Path, sweep: Sweep, results: Sequence[RunResult], metrics: Sequence[str]) -> None:
    """A table of mean ± std over seeds per cell and metric, with run counts, times and failures."""
    ok = [r for r in results if r.status == "ok"]
    seeds = ", ".join(str(s) for s in sweep.seeds) if sweep.seeds is not None else "the recipe's"
    total = sum(r.seconds or 0.0 for r in results)
    lines = [f"# Sweep `{sweep.path.name}`", "",
             f"Base recipe `{sweep.recipe}`; seeds: {seeds}. Each metric is the mean ± sample standard "
             f"deviation (n - 1) over the seeds that finished; `runs` counts finished / planned runs; "
             f"`time` is the mean wall time of one run. {len(ok)} of {len(results)} runs finished, "
             f"{total / 60:.1f} min of training in all.", ""]
    if sweep.common:
        lines += ["Overrides of every cell: " + " ".join(f"`{o}`" for o in sweep.common).replace("|", "\\|"), ""]
    rank = ranking_metric(sweep, results)
    lines += [f"Cells ranked by `{rank}` ({'lower' if lower_is_better(rank) else 'higher'} is better)."]
    if sweep.eval is not None:
        lines += [f"lmms-eval tasks ({LMMS_PREFIX}<task>/<metric>): {', '.join(sweep.eval.tasks)}"
                  + ("" if sweep.eval.limit is None else f", limit {format_value(sweep.eval.limit)}") + "."]
    lines += [""]
    header = ["cell", "overrides", "runs", *metrics, "time"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for cell, rows in rank_cells(sweep, results, rank):
        done = [r for r in rows if r.status == "ok"]
        values = [format_mean_std([float(r.metrics[m]) for r in done if m in r.metrics]) for m in metrics]
        times = [r.seconds for r in done if r.seconds is not None]
        time_text = f"{sum(times) / len(times):.0f} s" if times else "—"
        overrides = " ".join(f"`{o}`" for o in cell.overrides).replace("|", "\\|") or "(none)"
        lines.append("| " + " | ".join([cell.name, overrides, f"{len(done)}/{len(rows)}", *values, time_text]) + " |")
    baselines = []
    for m in metrics:
        key = baseline_key(m)
        if key is not None:
            vals = [float(r.metrics[key]) for r in ok if key in r.metrics]
            if vals:
                baselines.append(f"{m} {sum(vals) / len(vals):.3f}")
    if baselines:
        lines += ["", "Majority-answer baseline (most frequent training answer per question type): "
                  + ", ".join(baselines) + "."]
    missing = [m for m in metrics if not any(m in r.metrics for r in ok)]
    if ok and missing:
        lines += ["", f"Not found in any run's summary.json: {', '.join(missing)}."]
    bad = [r for r in results if r.status != "ok"]
    if bad:
        lines += ["", "Runs not finished:", ""]
        for r in bad:
            error = " ".join(r.error.split()) or "not run yet"
            lines.append(f"- `{r.run.cell.name}` seed {r.run.seed}: **{r.status}**: {error} (log: `{r.run.log}`)")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, sweep: Sweep, results: Sequence[RunResult], metric: str) -> None:
    """Bar chart of ``metric`` per cell (mean over seeds, error bar = std) with one dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _by_cell(sweep, results)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(cells) + 1.5), 4.0))
    for x, (_, rows) in enumerate(cells):
        values = [float(r.metrics[metric]) for r in rows if r.status == "ok" and metric in r.metrics]
        if not values:
            ax.text(x, 0, "no result", ha="center", va="bottom", rotation=90, color="tab:red", fontsize=8)
            continue
        mean, std = mean_std(values)
        ax.bar(x, mean, yerr=std or 0.0, capsize=4, color="tab:blue", alpha=0.6, width=0.6)
        offsets = [0.0] if len(values) == 1 else [-0.15 + 0.3 * i / (len(values) - 1) for i in range(len(values))]
        ax.scatter([x + o for o in offsets], values, color="black", s=14, zorder=3)
    key = baseline_key(metric)
    if key is not None:
        base = [float(r.metrics[key]) for r in results if r.status == "ok" and key in r.metrics]
        if base:
            ax.axhline(sum(base) / len(base), color="tab:gray", linestyle="--", label="majority baseline")
            ax.legend(loc="best", fontsize=8)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([c.name for c, _ in cells], rotation=30 if len(cells) > 3 else 0, ha="right"
                       if len(cells) > 3 else "center", fontsize=8)
    ax.set_ylabel(metric)
    plotted = [float(r.metrics[metric]) for r in results if r.status == "ok" and metric in r.metrics]
    if plotted and min(plotted) >= 0:
        ax.set_ylim(bottom=0)
    seeds = f"{len(sweep.seeds)} seeds" if sweep.seeds is not None else "one run per cell"
    ax.set_title(f"{sweep.path.stem}: {metric}\nbars: mean ± std over {seeds}; dots: single runs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table_reports(sweep: Sweep, results: Sequence[RunResult]) -> dict[str, Path]:
    """Write ``results.csv`` and ``results.md`` (cheap; refreshed after every finished run)."""
    metrics = choose_metrics(sweep, results)
    files = {"csv": sweep.out / "results.csv", "md": sweep.out / "results.md"}
    write_csv(files["csv"], results, metrics)
    write_markdown(files["md"], sweep, results, metrics)
    return files


def write_reports(sweep: Sweep, results: Sequence[RunResult]) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``results.png`` (the first metric) into the sweep's folder."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    files = write_table_reports(sweep, results)
    files["png"] = sweep.out / "results.png"
    write_plot(files["png"], sweep, results, ranking_metric(sweep, results))
    return files

