"""Throughput and MFU columns of metrics.csv (vlkit.training.throughput) through a tiny fit."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import vlkit
from vlkit.training.throughput import StepFlops, peak_flops, sequence_lengths

PEAK = 1e12


class CountTokens(Callback):
    """Counts each optimizer step's real tokens, sequences and images, and times it, independently."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}
        self._current = {"tokens": 0.0, "samples": 0.0, "images": 0.0}
        self._mark = 0.0
        self._step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self._mark:
            self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._current["tokens"] += float(batch["attention_mask"].sum())
        self._current["samples"] += batch["input_ids"].shape[0]
        self._current["images"] += batch["pixel_values"].shape[0]
        if trainer.global_step != self._step:
            now = time.perf_counter()
            self.steps[trainer.global_step - 1] = {**self._current, "seconds": now - self._mark}
            self._current = {"tokens": 0.0, "samples": 0.0, "images": 0.0}
            self._mark, self._step = now, trainer.global_step


def test_metrics_csv_has_throughput_and_mfu_matching_the_counted_tokens(tiny_recipe: Path, tmp_path: Path):
    recipe = vlkit.load_recipe(tiny_recipe, [
        "stages=[{name: tune, trainable: [encoders, fusion, llm], lr: 1.0e-3, max_steps: 3, accumulate: 2}]",
        f"trainer.peak_flops={PEAK}"])
    counter = CountTokens()
    vlkit.fit(recipe, tmp_path / "run", callbacks=[counter])
    with open(tmp_path / "run" / "stage0-tune" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("throughput/tokens_per_sec")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2] and sorted(counter.steps) == [0, 1, 2]
    for row in rows:
        got = {k.removeprefix("throughput/"): float(v) for k, v in row.items() if k.startswith("throughput/") and v}
        assert set(got) == {"tokens_per_sec", "samples_per_sec", "images_per_sec", "step_seconds", "tflops_per_sec",
                            "mfu"}
        assert all(v > 0 for v in got.values()), got
        seen = counter.steps[int(row["step"])]
        seconds = got["step_seconds"]
        assert got["tokens_per_sec"] * seconds == pytest.approx(seen["tokens"], rel=1e-6)
        assert got["samples_per_sec"] * seconds == pytest.approx(seen["samples"], rel=1e-6)
        assert got["images_per_sec"] * seconds == pytest.approx(seen["images"], rel=1e-6)
        assert seconds == pytest.approx(seen["seconds"], abs=0.05, rel=0.1)  # the same step, timed apart
        assert got["mfu"] == pytest.approx(got["tflops_per_sec"] * 1e12 / PEAK, rel=1e-6)


def test_llm_flops_formula_equals_torch_flop_counter(tiny_recipe: Path):
    """The LLM term (2 N T + 4 layers width L^2 per sequence, forward) against torch's FLOP counter on the LLM;
    and the vision term is the counter's own measurement, times the images."""
    from torch.utils.flop_counter import FlopCounterMode

    recipe = vlkit.load_recipe(tiny_recipe)
    model = vlkit.build_model(recipe)
    for p in model.parameters():
        p.requires_grad_(False)  # all frozen: every part counted once (forward only)
    flops = StepFlops(model)
    ids = torch.randint(0, 50, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.rand(3, 3, 32, 32)}
    with FlopCounterMode(display=False) as llm:
        model.llm(model.llm.embed(ids), batch["attention_mask"])
    flops.measure_images(batch)
    with FlopCounterMode(display=False) as vision:
        model.encode_images(batch["pixel_values"][:1])
    assert flops.encoder_image_flops > 0 and flops.fusion_image_flops > 0
    assert flops.encoder_image_flops + flops.fusion_image_flops == vision.get_total_flops()
    cfg = model.llm.model.config  # torch's counter sees the matmuls; attention is PaLM's 4 * layers * width * L^2
    attention = 4 * cfg.num_hidden_layers * cfg.hidden_size * 2 * 16**2
    assert flops(batch) == pytest.approx(llm.get_total_flops() + attention + 3 * vision.get_total_flops(), rel=1e-9)


def test_packed_rows_count_each_sequence_and_peaks_need_a_gpu_or_a_value():
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}
    assert sequence_lengths(batch) == [3, 2]
    assert sequence_lengths({"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}) == [2, 3]
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert peak_flops(torch.device("cpu"), torch.bfloat16, 5e12) == 5e12
