"""Run a recipe: its stages in order, inside a run folder that makes the run resumable.

Run folder layout::

    recipe.yaml                    the resolved, validated recipe (a rerun must match it)
    stage0-<name>/last/            checkpoint: model.safetensors + state.pt (optimizer, scheduler, progress)
    stage0-<name>/metrics.csv      training and validation metrics (Lightning CSV logger)
    stage0-<name>/done.json        written when the stage finished: its final validation metrics
    stage0-<name>/data-rank<r>.json  shards and sample counts each rank trained on, its validation steps
                                   in the final validation (padding batches included) and padding count
    summary.json                   final validation metrics, majority baseline, timings

Running again on the same folder skips finished stages and resumes an unfinished one from ``last/``.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console

from vlkit.config import Recipe
from vlkit.errors import CheckpointError, RecipeError
from vlkit.eval.budget import with_answer_budget
from vlkit.model import VLM, build_model
from vlkit.module import VLMModule
from vlkit.objectives.base import build_objective
from vlkit.registry import DATASETS, OBJECTIVES
from vlkit.training.checkpoint import WEIGHTS, SafetensorsCheckpointIO, latest_checkpoint, read_weights
from vlkit.training.lora import sync_lora
from vlkit.training.progress import progress_callbacks
from vlkit.training.stages import apply_trainable

MODEL_PREFIX = "model."


class PeriodicCheckpoint(Callback):
    """Save ``dirpath`` every ``every`` optimizer steps and when training ends (atomically, rank 0 writes).

    Why not Lightning's ``ModelCheckpoint(every_n_train_steps=N, save_last=True, save_top_k=0)``: a stage
    ends at ``max_steps`` inside an endless stream, and ModelCheckpoint's end-of-training save is skipped
    once any earlier step was saved (``on_train_end`` checks ``_last_checkpoint_saved``), so a stage whose
    ``max_steps`` is not a multiple of N would resume from a stale step; it also appends ``.ckpt`` and
    version suffixes (``last-v1``) to the one folder name that resume and export look up. What is left here
    is the step test; the saving itself is Lightning's (``trainer.save_checkpoint`` through
    :class:`~vlkit.training.checkpoint.SafetensorsCheckpointIO`)."""

    def __init__(self, dirpath: Path, every: int) -> None:
        self.dirpath = dirpath
        self.every = every
        self._saved_at = -1

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step != self._saved_at:
            trainer.save_checkpoint(self.dirpath, weights_only=False)  # with optimizer + loop state
            self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0 and trainer.global_step > 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)


@contextmanager
def _keep_metrics_before(csv_path: Path, step: int) -> Iterator[None]:
    """Keep the rows of ``csv_path`` logged before ``step`` across a resumed ``trainer.fit``.

    Lightning's CSV logger deletes an existing metrics file when it starts; on resume the rows of the
    steps before the checkpoint are read first and merged back in front of the new ones afterwards (also
    when training fails again), so a run's metrics survive any number of interruptions.
    """
    kept: list[dict[str, str]] = []
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            kept = [row for row in csv.DictReader(f) if row.get("step") and int(row["step"]) < step]
    try:
        yield
    finally:
        if kept:
            new: list[dict[str, str]] = []
            if csv_path.is_file():
                with open(csv_path, newline="") as f:
                    new = list(csv.DictReader(f))
            fields = list(dict.fromkeys(k for row in kept + new for k in row))
            tmp = csv_path.with_name(f".{csv_path.name}.tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept + new)
            tmp.replace(csv_path)


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / (Path(recipe.source).stem or "run")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def _claim_run_dir(run_dir: Path, recipe: Recipe) -> None:
    """Create the run folder, or check that an existing one was made by the same recipe."""
    saved = run_dir / "recipe.yaml"
    text = recipe.to_yaml()
    if saved.exists():
        old = saved.read_text()
        if old != text and not any(run_dir.glob("stage*/last/state.pt")):  # no checkpoint yet: reusable
            saved.unlink()
        elif old != text:
            import difflib

            diff = "".join(list(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                     "run folder recipe", "this recipe", n=0))[2:14])
            raise CheckpointError(
                f"run folder {run_dir} was created by a different recipe, so it cannot be resumed:\n{diff}"
                "Pass another --run-dir to start a new run (the existing one is left untouched)."
            )
        if saved.exists():
            return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"{run_dir} exists and is not a vlkit run folder (no recipe.yaml); refusing to "
                              "write into it. Pass another --run-dir.")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_name(".recipe.yaml.tmp")
    tmp.write_text(text)
    tmp.replace(saved)


def majority_baseline(dataset: Any, limit: int) -> dict[str | None, str]:
    """Most frequent training answer per question type (key None: over all samples)."""
    per_type: dict[str | None, Counter[str]] = {}
    for qtype, answer in dataset.iter_answers(limit):
        from vlkit.module import normalize_answer

        a = normalize_answer(answer)
        per_type.setdefault(qtype, Counter())[a] += 1
        per_type.setdefault(None, Counter())[a] += 1
    return {t: c.most_common(1)[0][0] for t, c in per_type.items() if c}


def load_stage_weights(model: VLM, checkpoint_dir: Path) -> None:
    """Load the model weights of a vlkit stage checkpoint (``<stage>/last``) into ``model``.

    Only the ``model.`` weights are read: other modules of a stage (e.g. a distillation teacher) are not
    part of the model.
    """
    state = read_weights(checkpoint_dir / WEIGHTS)
    state = {k.removeprefix(MODEL_PREFIX): v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint_dir} does not match the recipe's model: {len(missing)} missing keys "
                              f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def _checkpoint_step(checkpoint_dir: Path) -> int:
    """The optimizer step a stage checkpoint was saved at."""
    import torch

    state = torch.load(checkpoint_dir / "state.pt", map_location="cpu", weights_only=True)
    return int(state["global_step"])


def load_run(run_dir: str | Path) -> tuple[Recipe, VLM]:
    """Rebuild the model of a run folder from its recipe and load its latest weights."""
    from vlkit.config import load_recipe

    recipe = load_recipe(Path(run_dir) / "recipe.yaml")
    model = build_model(recipe)
    checkpoint = latest_checkpoint(run_dir)
    sync_lora(model, recipe.stages[: int(checkpoint.parent.name[len("stage"):].split("-", 1)[0]) + 1])
    load_stage_weights(model, checkpoint)
    return recipe, model.eval()


def _trainer(recipe: Recipe, stage_idx: int, stage_dir: Path, run_dir: Path,
             callbacks: list[Callback], model: VLM) -> L.Trainer:
    stage = recipe.stages[stage_idx]
    t = recipe.trainer
    from vlkit.data.base import stage_data_seed
    from vlkit.training.resume_state import ResumeState
    from vlkit.training.strategy import build_strategy
    from vlkit.training.throughput import ThroughputLogger

    cbs: list[Callback] = [ResumeState(stage_data_seed(recipe.seed, stage.name)),
                           PeriodicCheckpoint(stage_dir / "last", t.checkpoint_every),
                           ThroughputLogger(t.peak_flops), *callbacks]
    cbs += [*progress_callbacks(f"stage {stage_idx} {stage.name!r}", t.progress_bar,
                                                   t.log_every_n_steps)]
    val_every = stage.val_every * stage.accumulate if stage.val_every else None
    return L.Trainer(
        max_steps=stage.max_steps,
        max_epochs=-1,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(t.strategy, model),
        precision=stage.precision or t.precision,
        accumulate_grad_batches=stage.accumulate,
        gradient_clip_val=stage.grad_clip,
        log_every_n_steps=t.log_every_n_steps,
        logger=CSVLogger(run_dir, name="", version=stage_dir.name),
        callbacks=cbs,
        plugins=[SafetensorsCheckpointIO()],
        enable_checkpointing=False,
        enable_progress_bar=any(isinstance(c, RichProgressBar) for c in cbs),
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if val_every else 0,
        default_root_dir=str(stage_dir),
    )


def fit(recipe: Recipe, run_dir: str | Path | None = None, callbacks: list[Callback] | None = None,
        console: Console | None = None) -> dict[str, Any]:
    """Train every stage of ``recipe`` in ``run_dir`` (resuming what is there) and return the summary."""
    console = console or Console()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(recipe)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        _claim_run_dir(run_dir, recipe)
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    start = time.time()
    model = build_model(recipe)
    train_data = DATASETS.build(recipe.data.train, "data.train")
    val_data = DATASETS.build(recipe.data.val, "data.val") if recipe.data.val else None
    baseline = majority_baseline(train_data, recipe.eval.baseline_samples) if val_data else {}
    eval_cfg = with_answer_budget(recipe.eval, model, val_data)

    pending: Path | None = None  # weights of the last finished stage, loaded lazily
    stage_results: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    for i, stage in enumerate(recipe.stages):
        stage_dir = run_dir / f"stage{i}-{stage.name}"
        done = stage_dir / "done.json"
        if done.exists():
            result = json.loads(done.read_text())
            stage_results.append(result)
            metrics = result.get("val", {})
            pending = stage_dir / "last"
            console.print(f"[green]stage {i} {stage.name!r} already finished in {stage_dir}; skipping[/]")
            continue
        resume = stage_dir / "last"
        ckpt_path = str(resume) if (resume / "state.pt").exists() else None
        if ckpt_path:
            console.print(f"[cyan]resuming stage {i} {stage.name!r} from {resume}[/]")
            # Lightning restores them again in fit(); loading now lets the feature cache see these weights
            sync_lora(model, recipe.stages[: i + 1])  # the adapters this stage's checkpoint holds
            load_stage_weights(model, resume)
        elif pending is not None:
            sync_lora(model, recipe.stages[:i])
            load_stage_weights(model, pending)
        sync_lora(model, recipe.stages[: i + 1])  # this stage's `lora:` (new adapters, or merge)
        apply_trainable(model, stage, f"stages[{i}]")
        data = _stage_data(recipe, i, train_data)
        objective = build_objective(stage, model, eval_cfg, baseline, seed=recipe.seed, where=f"stages[{i}]")
        if recipe.data.feature_cache and not objective.needs_pixels:
            data = _with_feature_cache(recipe, i, model, data, console)
        module = VLMModule(model, stage, eval_cfg, data, val_data, baseline, seed=recipe.seed,
                           objective=objective, where=f"stages[{i}]")
        trainer = _trainer(recipe, i, stage_dir, run_dir, list(callbacks or []), model)
        stage_start = time.time()
        resume_step = _checkpoint_step(resume) if ckpt_path else 0
        with _keep_metrics_before(stage_dir / "metrics.csv", resume_step):
            trainer.fit(module, ckpt_path=ckpt_path)
        metrics = {}
        if module.can_validate:
            trainer.limit_val_batches = 1.0
            trainer.validate(module, verbose=False)
            metrics = dict(module.last_val_metrics)
        result = {"stage": stage.name, "steps": trainer.global_step, "seconds": time.time() - stage_start,
                  "val": metrics}
        _write_json(stage_dir / f"data-rank{trainer.global_rank}.json",
                    {"samples_by_shard": dict(module.shards_seen), "samples": sum(module.shards_seen.values()),
                     "val_batches": module.val_batches, "val_padding_batches": module.val_padding})
        if trainer.is_global_zero:
            _write_json(done, result)
        trainer.strategy.barrier()
        stage_results.append(result)
        pending = stage_dir / "last"

    summary = {"recipe": recipe.source, "run_dir": str(run_dir), "stages": stage_results, "val": metrics,
               "seconds": time.time() - start}
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        _write_json(run_dir / "summary.json", summary)
    return summary


def _stage_data(recipe: Recipe, index: int, train_data: Any) -> Any:
    """The training set of stage ``index``: ``data.train``, with the stage's ``data`` overrides merged in,
    or the stage's own dataset when its ``data`` names another one."""
    stage = recipe.stages[index]
    if not stage.data:
        return train_data
    if stage.data.get("name", recipe.data.train["name"]) != recipe.data.train["name"]:
        return DATASETS.build(stage.data, f"stages[{index}].data")
    return DATASETS.build({**recipe.data.train, **stage.data}, f"stages[{index}].data")


def _with_feature_cache(recipe: Recipe, index: int, model: VLM, data: Any, console: Console) -> Any:
    """``data`` reading the cached streams of the model's encoders, when they are all frozen in stage
    ``index`` (the cache is built for the encoders' current weights where missing); else ``data``."""
    from vlkit.data.feature_cache import build_cache, cache_device

    stage = recipe.stages[index]
    if any(p.requires_grad for p in model.encoders.parameters()):
        console.print(f"stage {index} {stage.name!r} trains encoders: reading pixels, not the feature cache")
        return data
    if not hasattr(data, "with_feature_cache"):
        raise RecipeError(f"the {type(data).__name__} dataset of stage {index} cannot read a feature cache; "
                          "remove data.feature_cache", "data.feature_cache")
    reader = build_cache(recipe, model, data.shards, recipe.data.feature_cache,
                         show_progress=recipe.trainer.progress_bar,  # encoded where and as the stage trains:
                         precision=stage.precision or recipe.trainer.precision,
                         device=cache_device(None, recipe.trainer.accelerator))
    console.print(f"stage {index} {stage.name!r}: encoders frozen, training reads cached streams from "
                  f"{reader.folder}")
    return data.with_feature_cache(reader)


def evaluate(recipe: Recipe, model: VLM) -> dict[str, float]:
    """Validation metrics of ``model`` on the recipe's ``data.val`` (single process)."""
    if recipe.data.val is None:
        raise CheckpointError(f"{recipe.source}: the recipe has no data.val to evaluate on")
    train_data = DATASETS.build(recipe.data.train, "data.train")
    val_data = DATASETS.build(recipe.data.val, "data.val")
    baseline = majority_baseline(train_data, recipe.eval.baseline_samples)
    eval_cfg = with_answer_budget(recipe.eval, model, val_data)
    lm = OBJECTIVES.build({"name": "lm"}, "eval", model=model, eval_cfg=eval_cfg, baseline=baseline,
                          seed=recipe.seed)  # answers on data.val, whatever the last stage optimised
    module = VLMModule(model, recipe.stages[-1], eval_cfg, train_data, val_data, baseline, seed=recipe.seed,
                       objective=lm)
    trainer = L.Trainer(accelerator=recipe.trainer.accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=recipe.trainer.progress_bar, use_distributed_sampler=False,
                        precision=recipe.stages[-1].precision or recipe.trainer.precision)
    trainer.validate(module, verbose=False)
    return dict(module.last_val_metrics)
