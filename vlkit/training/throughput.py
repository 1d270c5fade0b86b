"""Training throughput and model FLOPs utilisation (MFU), logged every optimizer step.

Columns in ``metrics.csv`` (and the progress bar): ``throughput/tokens_per_sec`` (real tokens: the attention
mask's ones, text and visual), ``throughput/samples_per_sec``, ``throughput/images_per_sec``,
``throughput/step_seconds``, ``throughput/tflops_per_sec`` and ``throughput/mfu`` (only where the peak is known).
Rates are over all ranks; a step's time runs from the end of the previous optimizer step (data loading
included).

Model FLOPs of a step (forward x 3 for a part whose weights train, x 2 for a frozen part that gradients pass
through, x 1 for a frozen part at the start of the graph):

* LLM: ``2 * N * T`` forward, ``N`` the weight-matrix parameters, which multiply every token (all but the input
  embedding table and the norms; a tied output head counted), ``T`` the step's real tokens, plus attention
  ``4 * layers * attention_width * L**2`` per sequence of ``L`` real tokens (PaLM's appendix B formula).
* Vision encoders and fusion: the forward FLOPs of one image measured with ``torch.utils.flop_counter`` at the
  first step (matmuls and convolutions, exact for ViTs, ConvNeXts, DaViT, Q-Formers, prompt text encoders),
  times the step's images; none for cached streams (the encoders do not run).
* A holistic module (it embeds the whole sequence) is counted like the LLM from its parameters and blocks.

``MFU = model FLOPs / step time / (peak FLOP/s per device x devices)``; the peak comes from
``trainer.peak_flops`` or, on CUDA, a table of known GPUs for the run's precision (A100, H100, H200, L40S,
RTX 4090, B200, then Lightning's table); on CPU only when ``trainer.peak_flops`` is set.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

# dense bf16 / fp16 tensor-core peaks (FLOP/s), by a lower-case substring of the device name, most specific first
HALF_PRECISION_PEAKS: tuple[tuple[str, float], ...] = (
    ("b200", 2.25e15), ("h200", 989e12), ("gh200", 989e12), ("h100 pcie", 756e12), ("h100 nvl", 835e12),
    ("h100", 989e12), ("a100", 312e12), ("l40s", 362e12), ("rtx 4090", 165e12), ("a6000", 155e12),
    ("l40", 181e12), ("l4", 121e12),
)


def precision_dtype(precision: str | int | None) -> torch.dtype:
    text = str(precision or "32")
    if text.startswith("bf16"):
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    return torch.float32


def peak_flops(device: torch.device, dtype: torch.dtype, configured: float | None = None) -> float | None:
    """Peak FLOP/s of one device: ``configured`` if given, else the known GPU's for ``dtype`` (None if unknown)."""
    if configured:
        return float(configured)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    if dtype in (torch.bfloat16, torch.float16):
        for key, flops in HALF_PRECISION_PEAKS:
            if key in name:
                return flops
    from lightning.fabric.utilities.throughput import get_available_flops

    found = get_available_flops(device, dtype)
    return float(found) if found else None


def _matrix_params(module: nn.Module, exclude: set[int]) -> int:
    """Parameters of the weight matrices (2-D and up) of ``module``: those that multiply every token."""
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2 and id(p) not in exclude)


def _trains(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def sequence_lengths(batch: dict[str, Any]) -> list[int]:
    """Real tokens of every sequence in the batch: a packed row (``position_ids`` restarting at 0) holds
    several sequences; otherwise each row's attention-mask sum."""
    mask = batch["attention_mask"]
    positions = batch.get("position_ids")
    if positions is None:
        return [int(n) for n in mask.sum(1).tolist()]
    lengths: list[int] = []
    for row, keep in zip(positions.tolist(), mask.bool().tolist()):
        run = 0
        for pos, real in zip(row, keep):
            if not real:
                continue
            if pos == 0 and run:
                lengths.append(run)
                run = 0
            run += 1
        if run:
            lengths.append(run)
    return lengths


def count_images(batch: dict[str, Any]) -> int:
    pixels = batch.get("pixel_values")
    if pixels is not None:
        return int(pixels.shape[0])
    streams = batch.get("image_streams") or {}
    return int(next(iter(streams.values())).shape[0]) if streams else 0


class StepFlops:
    """Model FLOPs of a training step of ``model`` (a VLM), from the batch; see the module docstring."""

    def __init__(self, model: Any) -> None:
        self.model = model
        llm = model.llm.model
        embed = llm.get_input_embeddings()
        head = llm.get_output_embeddings()
        exclude = {id(p) for p in embed.parameters()}
        self.llm_params = _matrix_params(llm, exclude)
        if head is not None and head.weight is embed.weight:  # tied: the head still multiplies every token
            self.llm_params += head.weight.numel()
        cfg = llm.config
        cfg = getattr(cfg, "get_text_config", lambda: cfg)()
        heads = getattr(cfg, "num_attention_heads", 0) or 0
        head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
        self.llm_attention = getattr(cfg, "num_hidden_layers", 0) * heads * head_dim
        self.llm_trains = _trains(model.llm)
        self.sequence_encoders = [e for e in model.encoders.values() if getattr(e, "embeds_sequence", False)]
        self.seq_params = 0
        self.seq_attention = 0
        for enc in self.sequence_encoders:
            text = getattr(enc, "text_embed", None)
            self.seq_params += _matrix_params(enc, {id(p) for p in text.parameters()} if text is not None else set())
            blocks = sum(1 for m in enc.modules() if enc.fsdp_wrap_block and type(m) is enc.fsdp_wrap_block)
            self.seq_attention += blocks * next(iter(enc.stream_dims.values()))
        self.seq_trains = any(_trains(e) for e in self.sequence_encoders)
        self.encoder_image_flops: float | None = None  # forward FLOPs of one image, measured at the first step
        self.fusion_image_flops = 0.0

    def measure_images(self, batch: dict[str, Any]) -> None:
        """Forward FLOPs of the encoders and the fusion on one image of ``batch`` (RNG and modes kept)."""
        from torch.utils.flop_counter import FlopCounterMode

        self.encoder_image_flops, self.fusion_image_flops = 0.0, 0.0
        pixels = batch.get("pixel_values")
        cached = batch.get("image_streams") or {}
        if self.sequence_encoders or not count_images(batch):
            if not self.sequence_encoders:
                self.encoder_image_flops = None  # no image in this batch: measure on a later one
            return
        model = self.model
        was_training = model.training
        device = next(model.parameters()).device
        # grad mode on: torch's FLOP counter cannot hook a module input that is a trainable leaf under no_grad
        # (e.g. a fusion's learned queries); the graph of this one image is dropped right after
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            model.eval()
            try:
                with FlopCounterMode(display=False) as enc:
                    if pixels is not None:
                        streams = model.image_streams(pixels[:1])
                    else:  # cached streams (n_images, views, N, C): the encoders do not run
                        # (bf16 under a bf16-mixed cache; outside autocast here, so in the fusion's dtype)
                        dtype = next(model.fusion.parameters()).dtype
                        streams = {k: v[:1].reshape(-1, *v.shape[2:]).to(dtype) for k, v in cached.items()}
                with FlopCounterMode(display=False) as fus:
                    model.fuse(streams, 1)
            finally:
                model.train(was_training)
        self.encoder_image_flops = float(enc.get_total_flops())
        self.fusion_image_flops = float(fus.get_total_flops())

    def __call__(self, batch: dict[str, Any]) -> float:
        lengths = sequence_lengths(batch)
        tokens = sum(lengths)
        squares = sum(n * n for n in lengths)
        vision_trains = any(_trains(e) for e in self.model.encoders.values()) or _trains(self.model.fusion)
        upstream = vision_trains or self.seq_trains
        llm = (2 * self.llm_params * tokens + 4 * self.llm_attention * squares) * (
            3 if self.llm_trains else 2 if upstream else 1)
        seq = (2 * self.seq_params * tokens + 4 * self.seq_attention * squares) * (3 if self.seq_trains else 1)
        images = count_images(batch)
        vision = 0.0
        if images and self.encoder_image_flops is not None:
            cached = batch.get("pixel_values") is None
            enc_mult = 3 if any(_trains(e) for e in self.model.encoders.values()) else 1
            fus_mult = 3 if _trains(self.model.fusion) else 2 if any(
                _trains(e) for e in self.model.encoders.values()) else 1
            vision = images * ((0.0 if cached else enc_mult * self.encoder_image_flops)
                               + fus_mult * self.fusion_image_flops)
        return float(llm + seq + vision)


class ThroughputLogger(Callback):
    """Log tokens/s, samples/s, images/s, step time, TFLOP/s and MFU every optimizer step (all ranks summed).

    Lightning's ``ThroughputMonitor`` assumes a fixed batch size and FLOPs per batch and averages over a
    window of batches; vision-language batches vary in both, so this callback counts each step's own
    tokens, images and FLOPs (:class:`StepFlops`), and takes only the GPU peak table from Lightning.
    """

    def __init__(self, configured_peak: float | None = None) -> None:
        self.configured_peak = configured_peak
        self.flops: StepFlops | None = None
        self.peak: float | None = None
        self._mark: float | None = None
        self._step = -1
        self._totals = [0.0, 0.0, 0.0, 0.0]  # tokens, samples, images, flops of the current optimizer step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flops = StepFlops(pl_module.model)
        self.peak = peak_flops(trainer.strategy.root_device, precision_dtype(trainer.precision), self.configured_peak)
        self._mark = None
        self._step = trainer.global_step
        self._totals = [0.0, 0.0, 0.0, 0.0]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._mark is None:
            self._mark = time.perf_counter()
        assert self.flops is not None
        if self.flops.encoder_image_flops is None:
            self.flops.measure_images(batch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert self.flops is not None and self._mark is not None
        lengths = sequence_lengths(batch)
        for i, value in enumerate((sum(lengths), len(lengths), count_images(batch), self.flops(batch))):
            self._totals[i] += value
        if trainer.global_step == self._step:  # still accumulating gradients
            return
        self._step = trainer.global_step
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        seconds = max(now - self._mark, 1e-9)
        self._mark = now
        totals = torch.tensor(self._totals, dtype=torch.float64, device=trainer.strategy.root_device)
        self._totals = [0.0, 0.0, 0.0, 0.0]
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        tokens, samples, images, flops = (float(v) for v in totals.cpu())
        metrics = {"tokens_per_sec": tokens / seconds, "samples_per_sec": samples / seconds,
                   "images_per_sec": images / seconds, "step_seconds": seconds,
                   "tflops_per_sec": flops / seconds / 1e12}
        if self.peak:
            metrics["mfu"] = flops / seconds / (self.peak * trainer.world_size)
        shown = {"tokens_per_sec", "mfu"}
        for name, value in metrics.items():
            pl_module.log(f"throughput/{name}", value, on_step=True, on_epoch=False, prog_bar=name in shown,
                          rank_zero_only=True)
