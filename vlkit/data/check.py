"""``vlkit data check RECIPE|URLS``: verify shards before a long run.

Every sample of every shard is read the way training reads it (webdataset's pipeline, see
:mod:`vlkit.data.reading`): the shard must be readable to its end and hold the sample count its
``index.json`` lists; each sample's JSON must hold a conversation, its image must decode, and (with a
processor: a recipe's model, or ``--tokenizer``) the conversation must tokenize within ``max_length`` with
at least one trained token. The result is a table per shard and the bad samples by shard and key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vlkit.data.base import ShardSource
from vlkit.data.conversation import messages_from_llava
from vlkit.data.processor import VLMProcessor
from vlkit.data.reading import (
    ERROR_KEY,
    LOST_KEY,
    BadSample,
    check_conversations,
    decode_image,
    expand_urls,
    image_bytes,
    indexed_counts,
    read_meta,
    read_shard,
)
from vlkit.errors import DataError, RecipeError


@dataclass
class ShardReport:
    """What checking one shard found."""

    url: str
    samples: int = 0
    """Samples read (good and bad)."""
    expected: int | None = None
    """The count ``index.json`` lists, if any."""
    images: int = 0
    """Samples whose image decoded."""
    tokenized: int = 0
    """Samples that tokenized within ``max_length`` with a trained token (0 without a processor)."""
    bad: list[tuple[str, str]] = field(default_factory=list)
    """``(key, reason)`` of each bad sample."""
    error: str | None = None
    """Why the shard could not be read to its end."""
    lost: int = 0
    """Samples lost to the shard error."""

    @property
    def ok(self) -> bool:
        return self.error is None and not self.bad


def check_shard(url: str, processor: VLMProcessor | None = None, rewrite: Any = None,
                tasks: Sequence[str] | None = None, conversations: bool = True,
                expected: int | None = None) -> ShardReport:
    """Read every sample of ``url`` and report what is wrong (see the module)."""
    report = ShardReport(url, expected=expected)
    for sample in read_shard(url, strict=False, expected=expected):
        if ERROR_KEY in sample:
            report.error, report.lost = sample[ERROR_KEY], int(sample[LOST_KEY])
            continue
        report.samples += 1
        key = sample["__key__"]
        try:
            image = decode_image(sample)
            if image is not None:
                report.images += 1
            if not conversations:
                if image_bytes(sample) is None:
                    raise BadSample("no image")
                continue
            meta = read_meta(sample)
            if tasks is not None and meta.get("task") not in tasks:
                continue
            messages = messages_from_llava(check_conversations(meta))
            if rewrite is not None:
                messages = rewrite(messages)
            if processor is not None:
                processor.train_features(messages, image)
                report.tokenized += 1
        except RecipeError:
            raise
        except (BadSample, DataError) as exc:
            report.bad.append((key, str(exc)))
    return report


def check_sources(sources: Sequence[ShardSource], processor: VLMProcessor | None) -> list[ShardReport]:
    """Check every shard of ``sources`` (a shard listed twice is checked once per way it is read)."""
    reports: list[ShardReport] = []
    for source in sources:
        expected = indexed_counts(source.shards)
        for url in source.shards:
            reports.append(check_shard(url, processor if source.conversations else None, source.rewrite,
                                       source.tasks, source.conversations, expected.get(url)))
    return reports


def check_recipe(recipe: Any, model: Any) -> dict[str, list[ShardReport]]:
    """Reports for the recipe's ``data.train``, ``data.val`` and the stages' own datasets, by where."""
    from vlkit.registry import DATASETS

    sections = {"data.train": recipe.data.train, "data.val": recipe.data.val}
    for i, stage in enumerate(recipe.stages):
        if stage.data:
            merged = stage.data if stage.data.get("name", recipe.data.train["name"]) != recipe.data.train["name"] \
                else {**recipe.data.train, **stage.data}
            sections[f"stages[{i}].data"] = merged
    out: dict[str, list[ShardReport]] = {}
    for where, section in sections.items():
        if not section:
            continue
        dataset = DATASETS.build(section, where)
        out[where] = check_sources(dataset.shard_sources(), dataset._processor(model.processor()))
    return out


def check_urls(urls: str, processor: VLMProcessor | None) -> dict[str, list[ShardReport]]:
    """Reports for the shards ``urls`` names."""
    return {urls: check_sources([ShardSource(expand_urls(urls))], processor)}


def url_processor(tokenizer: str, num_image_tokens: int, max_length: int) -> VLMProcessor:
    """A processor for checking shards without a recipe: ``tokenizer`` (folder or hub id) and its chat
    template, ``num_image_tokens`` per image, ``max_length``."""
    from transformers import AutoTokenizer

    from vlkit.data.conversation import get_template

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load tokenizer {tokenizer!r} ({exc}); pass a tokenizer folder or hub id") from None
    return VLMProcessor(tokenizer=tok, template=get_template("auto", tok), num_image_tokens=num_image_tokens,
                        image_size=32, max_length=max_length)


def print_reports(reports: dict[str, list[ShardReport]], console: Any, shown: int = 20) -> bool:
    """Print a summary table per dataset and the bad samples by shard and key; True when all is well."""
    from rich.table import Table

    all_ok = True
    for where, items in reports.items():
        table = Table(title=f"{where}: {len(items)} shard(s)", title_justify="left")
        for column in ("shard", "samples", "index", "images", "tokenized", "bad", "status"):
            table.add_column(column, justify="left" if column in ("shard", "status") else "right")
        for r in items:
            status = "ok" if r.ok else (f"[red]{r.error}; {r.lost} lost[/]" if r.error else "[yellow]bad samples[/]")
            table.add_row(r.url, str(r.samples), "-" if r.expected is None else str(r.expected), str(r.images),
                          str(r.tokenized), str(len(r.bad)), status)
        total_bad = sum(len(r.bad) for r in items)
        lost = sum(r.lost for r in items)
        table.caption = (f"{sum(r.samples for r in items)} samples, {total_bad} bad, "
                         f"{sum(1 for r in items if r.error)} unreadable shard(s) ({lost} samples lost)")
        console.print(table)
        bad = [(r.url, key, reason) for r in items for key, reason in r.bad]
        for url, key, reason in bad[:shown]:
            console.print(f"  {url}: sample {key}: {reason}", markup=False, highlight=False, soft_wrap=True)
        if len(bad) > shown:
            console.print(f"  ... and {len(bad) - shown} more bad samples", highlight=False)
        all_ok &= all(r.ok for r in items)
    return all_ok


__all__ = ["ShardReport", "check_recipe", "check_shard", "check_sources", "check_urls", "print_reports",
           "url_processor"]
