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
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import yaml
from rich.console import Console

from vlkit.config import Recipe, load_recipe, to_dataclass
from vlkit.errors import RecipeError, VlkitError

DEFAULT_METRIC = "val/accuracy"
LMMS_PREFIX = "lmms/"
EVAL_DIR = "lmms"
EVAL_STAMP = "sweep_eval.json"
ATTEMPTS_LOG = "sweep.jsonl"
Status = Literal["ok", "failed", "interrupted", "pending"]


@dataclass
class SweepEval:
    """A sweep's ``eval:`` block: lmms-eval tasks run by ``vlkit eval`` on every finished run."""

    tasks: list[str]
    """lmms-eval task names (local ones need ``include_path``)."""
    limit: float | None = None
    """Samples per task (a fraction of each task when below 1); None: every sample."""
    include_path: str | None = None
    """Folder of local lmms-eval task YAMLs, relative to the sweep file."""
    batch_size: int = 8
    max_new_tokens: int = 32
    """Generation budget of tasks that do not set their own ``max_new_tokens``."""


@dataclass
class SweepFile:
    """The schema of a sweep YAML file (see the module docstring)."""

    recipe: str
    """Base recipe, relative to the sweep file."""
    grid: dict[str, list[Any]] | None = None
    """Dotted recipe key -> values; one cell per combination (cartesian product, in key order)."""
    cells: list[dict[str, Any]] | None = None
    """Explicit cells: each a mapping of dotted key -> value, plus an optional ``name``."""
    seeds: list[int] | None = None
    """Seeds to run every cell with (``seed=`` override); None: once, with the recipe's own seed."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides applied to every cell before the cell's own."""
    metrics: list[str] | None = None
    """Summary metrics to report (default: ``val/accuracy`` and every ``val/accuracy/<type>`` found; with
    ``eval:``, every lmms-eval metric found after them)."""
    rank_by: str | None = None
    """The metric that ranks cells (best first, by mean over seeds) and is plotted: a ``val/...`` key of the
    runs' ``summary.json`` or ``lmms/<task>/<metric>``; default: the first reported metric."""
    eval: SweepEval | None = None
    """lmms-eval tasks to run on every finished run (``vlkit eval``; ``pip install 'vlkit[eval]'``)."""
    out: str | None = None
    """Output folder, relative to the sweep file (default: ``runs/<sweep file name>``)."""


@dataclass
class Cell:
    """One configuration of the sweep: a name (its folder) and its dotted overrides."""

    name: str
    overrides: list[str]
    """The cell's own overrides as ``key=value`` strings (without the sweep's common overrides)."""


@dataclass
class Run:
    """One cell trained with one seed."""

    cell: Cell
    seed: int
    overrides: list[str]
    """Everything passed to ``vlkit fit`` after the recipe: common, cell and seed overrides."""
    run_dir: Path
    log: Path
    recipe: Recipe
    """The resolved recipe (validated up front); its YAML must match a reused run folder's."""


@dataclass
class Sweep:
    """A validated sweep: every run's recipe has been loaded and checked, nothing has run."""

    path: Path
    recipe: Path
    cells: list[Cell]
    runs: list[Run]
    out: Path
    metrics: list[str] | None
    seeds: list[int] | None
    common: list[str] = field(default_factory=list)
    """The sweep's ``overrides:`` as ``key=value`` strings (applied before every cell's own)."""
    rank_by: str | None = None
    eval: SweepEval | None = None
    """The ``eval:`` block, ``include_path`` resolved against the sweep file."""


@dataclass
class RunResult:
    """What is known about one run after (or without) this invocation."""

    run: Run
    status: Status
    reused: bool = False
    """True when the run had finished in an earlier invocation and was skipped this time."""
    seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """The run's final validation metrics (``summary.json``'s ``val``)."""
    error: str = ""


@dataclass
class SweepReport:
    """The outcome of :func:`run_sweep`: one result per run and the report files written."""

    sweep: Sweep
    results: list[RunResult]
    metrics: list[str]
    files: dict[str, Path]
    ran: list[Run]
    """Runs attempted in this invocation (the others were finished already)."""
    rank_by: str = DEFAULT_METRIC

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.results if r.status != "ok"]


# --------------------------------------------------------------------------------------------- loading


def format_value(value: Any) -> str:
    """An override value as text that the recipe loader (YAML) reads back as ``value``."""
    if isinstance(value, str) and "\n" not in value:
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _label(value: Any) -> str:
    """A short readable form of an override value for cell names: ``token_concat+projector=linear``."""
    if isinstance(value, Mapping):
        parts = [_label(value["name"])] if "name" in value else []
        parts += [f"{k}={_label(v)}" for k, v in value.items() if k != "name"]
        return "+".join(parts)
    if isinstance(value, list):
        return "_".join(_label(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value)


def safe_name(text: str, limit: int = 80) -> str:
    """``text`` as a folder name: unusual characters become ``_``; long names are cut and made unique."""
    name = re.sub(r"[^A-Za-z0-9._=+,-]+", "_", text).strip("._") or "cell"
    if len(name) > limit:
        name = f"{name[:limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def _auto_name(overrides: Mapping[str, Any], keys: Sequence[str]) -> str:
    """``fusion.name=mlp,lr=0.001``-style name: the last key component unless two keys share it."""
    if not overrides:
        return "base"
    lasts = [k.rsplit(".", 1)[-1] for k in keys]
    parts = []
    for key, value in overrides.items():
        short = key.rsplit(".", 1)[-1]
        parts.append(f"{key if lasts.count(short) > 1 else short}={_label(value)}")
    return safe_name(",".join(parts))


def _check_keys(mapping: Mapping[Any, Any], where: str) -> None:
    for key in mapping:
        if not isinstance(key, str) or not key or "=" in key:
            raise RecipeError(f"override keys must be dotted recipe keys such as stages.0.lr, got {key!r}", where)


def _cells(spec: SweepFile) -> list[tuple[str, dict[str, Any]]]:
    if (spec.grid is None) == (spec.cells is None):
        raise RecipeError("give exactly one of `grid` (dotted key -> list of values) or `cells` (a list of "
                          "override mappings)")
    cells: list[tuple[str, dict[str, Any]]] = []
    if spec.grid is not None:
        if not spec.grid:
            raise RecipeError("name at least one key to vary", "grid")
        _check_keys(spec.grid, "grid")
        for key, values in spec.grid.items():
            if not values:
                raise RecipeError("needs at least one value", f"grid.{key}")
        keys = list(spec.grid)
        for combo in itertools.product(*spec.grid.values()):
            overrides = dict(zip(keys, combo))
            cells.append((_auto_name(overrides, keys), overrides))
    else:
        assert spec.cells is not None
        if not spec.cells:
            raise RecipeError("list at least one cell", "cells")
        all_keys = sorted({k for c in spec.cells for k in c if k != "name"})
        for i, cell in enumerate(spec.cells):
            overrides = {k: v for k, v in cell.items() if k != "name"}
            _check_keys(overrides, f"cells[{i}]")
            name = cell.get("name")
            if name is None:
                name = _auto_name(overrides, all_keys)
            elif not isinstance(name, str) or safe_name(name) != name:
                raise RecipeError(f"cell names become folder names: use letters, digits and . _ = + , - "
                                  f"(e.g. {safe_name(str(name))!r}), got {name!r}", f"cells[{i}].name")
            cells.append((name, overrides))
    seen: dict[str, int] = {}
    for i, (name, _) in enumerate(cells):
        if name in seen:
            raise RecipeError(f"cells {seen[name]} and {i} are both named {name!r}; give them distinct `name`s")
        seen[name] = i
    return cells


def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    """Read a sweep file and validate every run's recipe (base recipe + overrides) before anything runs.

    Raises RecipeError naming the sweep file, and the cell, for a malformed sweep or an invalid override.
    ``out`` overrides the sweep file's ``out`` (relative to the working directory).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"sweep file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    try:
        spec = to_dataclass(SweepFile, data)
        cells = _cells(spec)
        if spec.seeds is not None and (not spec.seeds or len(set(spec.seeds)) != len(spec.seeds)):
            raise RecipeError("list one or more distinct seeds (or leave `seeds` out)", "seeds")
        _check_keys(spec.overrides, "overrides")
        _check_eval(spec)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    recipe_path = Path(os.path.normpath(path.parent / spec.recipe))
    if out is None:
        out = path.parent / spec.out if spec.out else path.parent / "runs" / path.stem
    out = Path(os.path.normpath(out))
    common = [f"{k}={format_value(v)}" for k, v in spec.overrides.items()]
    if spec.eval is not None and spec.eval.include_path is not None:
        include = Path(os.path.normpath(path.parent / spec.eval.include_path))
        if not include.is_dir():
            raise RecipeError(f"{path}: eval.include_path: folder not found: {include}")
        spec.eval.include_path = str(include)

    sweep_cells: list[Cell] = []
    runs: list[Run] = []
    for name, overrides in cells:
        cell = Cell(name, [f"{k}={format_value(v)}" for k, v in overrides.items()])
        sweep_cells.append(cell)
        for seed in spec.seeds if spec.seeds is not None else [None]:
            extra = [] if seed is None else [f"seed={seed}"]
            try:
                recipe = load_recipe(recipe_path, [*common, *cell.overrides, *extra])
            except RecipeError as exc:
                raise RecipeError(f"{path}: cell {name!r}: {exc}") from None
            run_dir = out / name / f"seed{recipe.seed}"
            runs.append(Run(cell, recipe.seed, [*common, *cell.overrides, *extra], run_dir,
                            run_dir.with_name(f"{run_dir.name}.log"), recipe))
    return Sweep(path, recipe_path, sweep_cells, runs, out, spec.metrics, spec.seeds, common, spec.rank_by,
                 spec.eval)


def _check_eval(spec: SweepFile) -> None:
    """The ``eval:`` block and ``rank_by`` name something this sweep reports."""
    if spec.eval is not None:
        if not spec.eval.tasks or not all(isinstance(t, str) and t and "," not in t for t in spec.eval.tasks):
            raise RecipeError("list one or more lmms-eval task names (without commas)", "eval.tasks")
        if spec.eval.limit is not None and spec.eval.limit <= 0:
            raise RecipeError(f"must be positive (samples, or a fraction below 1), got {spec.eval.limit}",
                              "eval.limit")
    for where, key in [("rank_by", spec.rank_by), *((f"metrics[{i}]", m) for i, m in enumerate(spec.metrics or []))]:
        if key is None:
            continue
        if not isinstance(key, str) or not key.startswith(("val/", LMMS_PREFIX)):
            raise RecipeError(f"{key!r} is not a metric: use a validation metric (val/accuracy, val/anls/<type>, "
                              f"...) or an lmms-eval score ({LMMS_PREFIX}<task>/<metric>)", where)
        if key.startswith(LMMS_PREFIX):
            task = key[len(LMMS_PREFIX):].split("/", 1)[0]
            tasks = spec.eval.tasks if spec.eval is not None else []
            if task not in tasks or key.count("/") != 2:
                raise RecipeError(f"{key!r}: lmms-eval scores are {LMMS_PREFIX}<task>/<metric> of a task in the "
                                  f"sweep's eval.tasks ({', '.join(tasks) or 'no eval: block'})", where)


# --------------------------------------------------------------------------------------------- running


def _trained(run: Run) -> bool:
    return (run.run_dir / "summary.json").is_file()


def _eval_spec(sweep: Sweep) -> dict[str, Any] | None:
    import dataclasses

    return None if sweep.eval is None else dataclasses.asdict(sweep.eval)


def _evaluated(sweep: Sweep, run: Run) -> bool:
    """No ``eval:`` block, or the run's lmms-eval scores were computed with this one."""
    if sweep.eval is None:
        return True
    stamp = run.run_dir / EVAL_DIR / EVAL_STAMP
    try:
        return json.loads(stamp.read_text()) == _eval_spec(sweep) and (run.run_dir / EVAL_DIR / "results.json").is_file()
    except (OSError, json.JSONDecodeError):
        return False


def _is_done(sweep: Sweep, run: Run) -> bool:
    return _trained(run) and _evaluated(sweep, run)


def lmms_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """``lmms/<task>/<metric>`` -> score from lmms-eval's ``results`` section (``"exact_match,none"`` ->
    ``exact_match``; other filters stay: ``exact_match,strict-match``; standard errors and aliases left out)."""
    out: dict[str, float] = {}
    for task, scores in results.items():
        for key, value in scores.items():
            metric, _, flt = key.partition(",")
            if "_stderr" in metric or isinstance(value, (str, bool)) or not isinstance(value, (int, float)):
                continue
            out[f"{LMMS_PREFIX}{task}/{metric if flt in ('', 'none') else key}"] = float(value)
    return out


def _run_metrics(sweep: Sweep, run: Run) -> dict[str, float]:
    """The run's final validation metrics (``summary.json``'s ``val``) and its lmms-eval scores."""
    summary = json.loads((run.run_dir / "summary.json").read_text())
    metrics = dict(summary.get("val") or {})
    if sweep.eval is not None and _evaluated(sweep, run):
        results = json.loads((run.run_dir / EVAL_DIR / "results.json").read_text())
        metrics.update(lmms_metrics(results.get("results") or {}))
    return metrics


def _stale(run: Run) -> str | None:
    """An error when a finished run folder was trained with another recipe than this cell's."""
    saved = run.run_dir / "recipe.yaml"
    if saved.is_file() and saved.read_text() != run.recipe.to_yaml():
        return (f"run folder {run.run_dir} was trained with a different recipe than this cell now resolves to "
                f"(the sweep or base recipe changed since); delete the folder to retrain it, or use another --out")
    return None


def _attempts(out: Path) -> list[dict[str, Any]]:
    log = out / ATTEMPTS_LOG
    if not log.is_file():
        return []
    rows = []
    for line in log.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return rows


def _error_tail(text: str, lines: int = 6) -> str:
    """The end of a failed run's output: from vlkit's ``error:`` line if there is one, else the last lines."""
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    for i in range(len(kept) - 1, -1, -1):
        if kept[i].startswith("error:"):
            return "\n".join(kept[i:i + lines])
    return "\n".join(kept[-lines:])


class _Job:
    """A ``vlkit fit`` (phase ``fit``) or ``vlkit eval`` (phase ``eval``) subprocess for one run, writing
    into the run's log file."""

    def __init__(self, sweep: Sweep, run: Run, threads: int | None, phase: Literal["fit", "eval"] = "fit") -> None:
        self.sweep = sweep
        self.run = run
        self.phase = phase
        run.log.parent.mkdir(parents=True, exist_ok=True)
        if phase == "fit":
            self.cmd = [sys.executable, "-m", "vlkit.cli", "fit", str(sweep.recipe), *run.overrides,
                        "--run-dir", str(run.run_dir)]
        else:
            assert sweep.eval is not None
            e = sweep.eval
            self.cmd = [sys.executable, "-m", "vlkit.cli", "eval", str(run.run_dir), "--tasks", ",".join(e.tasks),
                        "--out", str(run.run_dir / EVAL_DIR), "--batch-size", str(e.batch_size),
                        "--max-new-tokens", str(e.max_new_tokens),
                        *([] if e.limit is None else ["--limit", format_value(e.limit)]),
                        *([] if e.include_path is None else ["--include-path", e.include_path])]
            (run.run_dir / EVAL_DIR / EVAL_STAMP).unlink(missing_ok=True)  # scores of another block
        self.log: IO[str] = open(run.log, "a")  # noqa: SIM115 - closed in finish()
        self.offset = self.log.tell()
        self.log.write(f"=== vlkit sweep: cell {run.cell.name!r} seed {run.seed} ({phase}), "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n$ {shlex.join(self.cmd)}\n")
        self.log.flush()
        env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "160")}
        if threads is not None:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        self.start = time.time()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)

    def stop(self, timeout: float = 20.0) -> None:
        """Ask the process to stop (SIGTERM), then kill it if it does not within ``timeout`` seconds."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def finish(self, interrupted: bool = False) -> dict[str, Any]:
        """Close the log and return the attempt record for ``sweep.jsonl``."""
        seconds = time.time() - self.start
        self.log.close()
        rc = self.proc.returncode
        ok = rc == 0 and (_trained(self.run) if self.phase == "fit" else (self.run.run_dir / EVAL_DIR /
                                                                           "results.json").is_file())
        if ok and self.phase == "eval":
            _atomic_json(self.run.run_dir / EVAL_DIR / EVAL_STAMP, _eval_spec(self.sweep))
        status = "ok" if ok else "interrupted" if interrupted else "failed"
        error = ""
        if not ok:
            with open(self.run.log) as f:
                f.seek(self.offset)
                error = _error_tail(f.read())
            if interrupted:
                error = "interrupted (the sweep was stopped); rerun the sweep to resume"
            elif not error:
                error = f"vlkit {self.phase} exited with status {rc}"
        return {"cell": self.run.cell.name, "seed": self.run.seed, "run_dir": str(self.run.run_dir),
                "phase": self.phase, "status": status, "returncode": rc, "seconds": round(seconds, 3),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "error": error}


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _record(out: Path, attempt: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ATTEMPTS_LOG, "a") as f:
        f.write(json.dumps(attempt) + "\n")


def collect_results(sweep: Sweep, ran: Sequence[Run] = ()) -> list[RunResult]:
    """The state of every run from its folder and ``sweep.jsonl``; ``ran``: runs attempted just now."""
    last: dict[tuple[str, int], dict[str, Any]] = {}
    ok_seconds: dict[tuple[str, int], float] = {}
    for a in _attempts(sweep.out):
        key = (a.get("cell", ""), a.get("seed", -1))
        last[key] = a
        if a.get("status") == "ok" and a.get("phase", "fit") == "fit":
            ok_seconds[key] = float(a.get("seconds", 0.0))
    ran_keys = {(r.cell.name, r.seed) for r in ran}
    results = []
    for run in sweep.runs:
        key = (run.cell.name, run.seed)
        attempt = last.get(key)
        stale = _stale(run) if _trained(run) else None
        if _is_done(sweep, run) and not stale:
            summary = json.loads((run.run_dir / "summary.json").read_text())
            seconds = ok_seconds.get(key, summary.get("seconds"))
            results.append(RunResult(run, "ok", key not in ran_keys, seconds, _run_metrics(sweep, run)))
        elif stale:
            results.append(RunResult(run, "failed", error=stale))
        elif attempt is not None and attempt.get("status") in ("failed", "interrupted"):
            results.append(RunResult(run, attempt["status"], seconds=attempt.get("seconds"),
                                     error=attempt.get("error", "")))
        else:  # never attempted, or its finished run folder was removed since
            results.append(RunResult(run, "pending"))
    return results


def run_sweep(sweep: Sweep, jobs: int = 1, console: Console | None = None) -> SweepReport:
    """Train every run of ``sweep`` that has not finished, ``jobs`` processes at a time; write the reports.

    A run that fails is recorded and the others go on. On KeyboardInterrupt (or SIGTERM) the running
    processes are stopped, the reports are written for what finished, and KeyboardInterrupt is re-raised;
    running the sweep again completes only the missing runs.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if jobs < 1:
        raise VlkitError(f"--jobs must be at least 1, got {jobs}")
    console = console or Console()
    sweep.out.mkdir(parents=True, exist_ok=True)
    todo: list[Run] = []
    for run in sweep.runs:
        stale = _stale(run) if _trained(run) else None
        if stale:
            console.print(f"[red]✗ {run.cell.name} seed {run.seed}: {stale}[/]")
        elif not _is_done(sweep, run):
            todo.append(run)
    done_before = len(sweep.runs) - len(todo)
    console.print(f"sweep {sweep.path}: {len(sweep.cells)} cell(s) x {len(sweep.runs) // len(sweep.cells)} "
                  f"seed(s) = {len(sweep.runs)} runs; {done_before} finished already, {len(todo)} to run "
                  f"({min(jobs, max(1, len(todo)))} at a time) in {sweep.out}")
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    ran: list[Run] = []
    running: list[_Job] = []
    queue = list(todo)

    def _on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old_handler = None
    if hasattr(signal, "SIGTERM") and _in_main_thread():
        old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    try:
        with progress:
            task = progress.add_task("runs", total=len(sweep.runs), completed=done_before)
            while queue or running:
                while queue and len(running) < jobs:
                    run = queue.pop(0)
                    running.append(_Job(sweep, run, threads, "eval" if _trained(run) else "fit"))
                    ran.append(run)
                progress.update(task, description="running " + ", ".join(
                    f"{j.run.cell.name}/seed{j.run.seed}" for j in running))
                time.sleep(0.2)
                for job in [j for j in running if j.proc.poll() is not None]:
                    running.remove(job)
                    attempt = job.finish()
                    _record(sweep.out, attempt)
                    if attempt["status"] == "ok" and not _evaluated(sweep, job.run):
                        running.append(_Job(sweep, job.run, threads, "eval"))  # trained: now its lmms-eval tasks
                        continue
                    progress.advance(task)
                    _print_attempt(progress.console, sweep, job.run, attempt)
                    write_table_reports(sweep, collect_results(sweep, ran))
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted: stopping {len(running)} running run(s); rerun the sweep to "
                      f"complete the missing ones[/]")
        for job in running:
            job.stop()
            _record(sweep.out, job.finish(interrupted=True))
        write_reports(sweep, collect_results(sweep, ran))
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    results = collect_results(sweep, ran)
    metrics = choose_metrics(sweep, results)
    files = write_reports(sweep, results)
    return SweepReport(sweep, results, metrics, files, ran, ranking_metric(sweep, results))


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _print_attempt(console: Console, sweep: Sweep, run: Run, attempt: dict[str, Any]) -> None:
    where = f"{run.cell.name} seed {run.seed}"
    if attempt["status"] == "ok":
        val = _run_metrics(sweep, run)
        keys = dict.fromkeys([k for k in (sweep.rank_by, DEFAULT_METRIC, "val/loss") if k])
        shown = ", ".join(f"{k} {val[k]:.4g}" for k in keys if k in val)
        console.print(f"[green]✓[/] {where} ({attempt['seconds']:.0f} s){': ' + shown if shown else ''}",
                      highlight=False)
    else:
        first = attempt["error"].splitlines()[0] if attempt["error"] else ""
        where += "" if attempt.get("phase", "fit") == "fit" else " (vlkit eval)"
        console.print(f"[red]✗[/] {where} failed ({attempt['seconds']:.0f} s): {first} (log: {run.log})",
                      highlight=False)


# --------------------------------------------------------------------------------------------- reports


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


def describe(sweep: Sweep, console: Console) -> None:
    """Print the runs of a sweep, their overrides and whether each has finished (``--dry-run``)."""
    from rich.table import Table

    table = Table(title=f"sweep {sweep.path} -> {sweep.out}")
    for col in ("cell", "seed", "overrides", "state"):
        table.add_column(col)
    for run in sweep.runs:
        stale = _trained(run) and _stale(run)
        state = ("stale" if stale else "finished" if _is_done(sweep, run) else
                 "to evaluate" if _trained(run) else "to run")
        table.add_row(run.cell.name, str(run.seed), " ".join(run.cell.overrides) or "(base recipe)", state)
    console.print(table)


__all__ = ["Cell", "Run", "RunResult", "Sweep", "SweepEval", "SweepFile", "SweepReport", "collect_results",
           "describe", "format_value", "lmms_metrics", "load_sweep", "rank_cells", "run_sweep", "write_reports"]
