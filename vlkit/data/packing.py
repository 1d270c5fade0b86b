"""Multimodal sequence packing: a training batch's samples share rows instead of each padding to the longest.

``data.train.packing: {max_tokens: N}`` packs the ``batch_size`` samples of every training batch
first-fit-decreasing into as few rows of at most ``N`` tokens as it finds (rows are then padded to the longest
row). A step therefore trains on exactly the samples it would train on unpacked, with the same loss; only the
padding goes. The buffer FFD packs is the batch: the shuffle buffer has already mixed the stream, and packing
across batches would change which samples share a step (and make the stream's saved position, which resume
relies on, depend on samples not yet trained on).

What keeps samples apart in a row:

* ``position_ids`` restart at 0 at every sample (the row's padding is one more block, also from 0);
* ``attention_mask`` (2D) still marks the real tokens; the LLM is called with ``position_ids`` and no 2D mask,
  so transformers builds the block-diagonal causal mask from the position restarts (``masking_utils``:
  ``find_packed_sequence_indices`` for sdpa / eager / flex; the varlen kernel for flash attention, which
  :meth:`vlkit.llms.base.LLM.forward` serves one flattened row);
* labels are ``-100`` at the first token of every sample, so no sample's first token is predicted from the
  previous sample's last one (unpacked, the first token is never a target either);
* a sample is never split, so neither is its image-token block; the images (pixels or cached streams) are
  stacked in the order their blocks appear in the rows, which is the order the splice strategy fills them.

Loss weighting is token-weighted: the LLM's loss is the mean over every trained token of the batch, packed or
not (transformers' causal-LM loss with ``reduction="mean"``), so a packed batch's loss equals the same samples'
padded batch's loss (``tests/test_packing.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vlkit.constants import IGNORE_INDEX
from vlkit.errors import DataError, RecipeError

if TYPE_CHECKING:
    from vlkit.data.processor import VLMProcessor


@dataclass
class PackingArgs:
    """``data.train.packing``: pack each training batch's samples into rows of at most ``max_tokens``."""

    max_tokens: int
    """Longest row in tokens (visual tokens included); at least the dataset's ``max_length``, so every sample
    that passes ``max_length`` / ``overflow`` fits a row."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RecipeError(f"packing.max_tokens must be a positive number of tokens, got {self.max_tokens}")


def check_packing(packing: PackingArgs | None, max_length: int) -> None:
    """Recipe-time check of a dataset section's ``packing`` against its ``max_length``."""
    if packing is not None and packing.max_tokens < max_length:
        raise RecipeError(f"packing.max_tokens ({packing.max_tokens}) is below max_length ({max_length}): a sample "
                          f"of max_length tokens could not fit a row. Raise packing.max_tokens to at least "
                          f"{max_length}, or lower max_length (longer samples then follow `overflow`)")


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of total length at most ``capacity``: longest first, each into
    the first row with room (ties by index, so the result is deterministic); each row lists its indices in
    increasing order. Raises :class:`DataError` for a length over ``capacity``."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise DataError(f"a sample of {n} tokens does not fit a packed row of {capacity} tokens; raise "
                            "data.train.packing.max_tokens to at least data.train.max_length")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return [sorted(row) for row in rows]


def collate_packed(processor: VLMProcessor, features: Sequence[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """A packed training batch of ``features`` (training features with labels, see
    :meth:`~vlkit.data.processor.VLMProcessor.train_features`): ``input_ids``, ``labels``, ``attention_mask``
    (real tokens) and ``position_ids`` of shape ``(rows, longest row)``, ``pixel_values`` / ``image_streams``
    in row order, the other keys as lists in row order, and ``packed_rows`` (each row's samples as indices
    into those lists)."""
    if not features:
        raise DataError("cannot collate an empty batch")
    rows = first_fit_decreasing([len(f["input_ids"]) for f in features], max_tokens)
    order = [i for row in rows for i in row]
    length = max(sum(len(features[i]["input_ids"]) for i in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, processor.pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    packed_rows: list[list[int]] = []
    k = 0
    for r, row in enumerate(rows):
        start = 0
        packed_rows.append([])
        for i in row:
            f = features[i]
            n = len(f["input_ids"])
            sl = slice(start, start + n)
            input_ids[r, sl] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[r, sl] = torch.tensor(f["labels"], dtype=torch.long)
            labels[r, start] = IGNORE_INDEX  # never predicted from the previous sample's last token
            attention_mask[r, sl] = 1
            position_ids[r, sl] = torch.arange(n)
            packed_rows[-1].append(k)
            start, k = start + n, k + 1
        position_ids[r, start:] = torch.arange(length - start)  # the padding: a block of its own
    ordered = [features[i] for i in order]
    processor.require_trained(labels, ordered)
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                             "position_ids": position_ids, **processor.stack_images(ordered),
                             "packed_rows": packed_rows}
    for key in features[0]:
        if key not in batch and key not in ("input_ids", "labels", "pixel_values", "image_streams"):
            batch[key] = [f.get(key) for f in ordered]
    return batch


def sample_spans(batch: dict[str, Any]) -> list[tuple[int, torch.Tensor]]:
    """``(row, token indices)`` of every sample of a training batch, in the order of its per-sample lists:
    a padded batch's row ``i`` is sample ``i`` (its real tokens); a packed one's samples are the runs of its
    rows that start where ``position_ids`` restart at 0 (``packed_rows`` says which sample each run is)."""
    mask = batch["attention_mask"].bool()
    if "packed_rows" not in batch:
        return [(i, mask[i].nonzero().flatten()) for i in range(mask.shape[0])]
    spans: dict[int, tuple[int, torch.Tensor]] = {}
    for r, row in enumerate(batch["packed_rows"]):
        real = int(mask[r].sum())  # a row's samples come first, then its padding
        starts = [*(batch["position_ids"][r, :real] == 0).nonzero().flatten().tolist(), real]
        for k, (a, b) in zip(row, itertools.pairwise(starts)):
            spans[k] = (r, torch.arange(a, b))
    return [spans[k] for k in range(len(spans))]


__all__ = ["PackingArgs", "check_packing", "collate_packed", "first_fit_decreasing", "sample_spans"]
