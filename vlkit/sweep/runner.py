"""Running a sweep: one ``vlkit fit`` (then ``vlkit eval`` for an ``eval:`` block) subprocess per run,
reusing finished run folders, recording every attempt in ``sweep.jsonl`` and collecting the results."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from rich.console import Console

from vlkit.errors import VlkitError
from vlkit.sweep.report import choose_metrics, ranking_metric, write_reports, write_table_reports
from vlkit.sweep.spec import DEFAULT_METRIC, LMMS_PREFIX, Run, RunResult, Sweep, format_value

EVAL_DIR = "lmms"
EVAL_STAMP = "sweep_eval.json"
ATTEMPTS_LOG = "sweep.jsonl"


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

