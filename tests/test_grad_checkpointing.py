"""Activation checkpointing (``gradient_checkpointing: true`` on a part): the same gradients, and the part's
blocks (its ``fsdp_wrap_block`` class) really run again in the backward pass."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from vlkit.registry import ENCODERS, LLMS

CLIP_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}}
DINO_CFG = {"model": "vit_small_patch14_dinov2", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
            "num_heads": 2}
CONVNEXT_CFG = {"vision_cfg": {"timm_model_name": "convnext_atto", "image_size": 64,
                               "timm_kwargs": {"depths": [2, 1, 1, 1], "dims": [8, 16, 24, 32]}}}
QFORMER_CFG = {"num_query_tokens": 4,
               "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
               "qformer_config": {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "cross_attention_frequency": 1}}
FLORENCE_CFG = {
    "vision_config": {"depths": [1, 2], "embed_dim": [16, 32], "num_heads": [2, 4], "num_groups": [2, 4],
                      "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1],
                      "patch_prenorm": [False, True], "window_size": 4, "projection_dim": 24, "drop_path_rate": 0.0},
    "text_config": {"vocab_size": 64, "d_model": 24, "encoder_layers": 2, "decoder_layers": 1,
                    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 48,
                    "decoder_ffn_dim": 48, "max_position_embeddings": 64},
}
ENCODER_SECTIONS = {
    "clip": ({"name": "clip", "config": CLIP_CFG}, 32),
    "dinov2": ({"name": "dinov2", "config": DINO_CFG}, 32),
    "convnext_clip": ({"name": "convnext_clip", "config": CONVNEXT_CFG}, 64),
    "qformer": ({"name": "qformer", "config": QFORMER_CFG}, 32),
    "florence2": ({"name": "florence2", "config": FLORENCE_CFG, "image_size": 32, "prompts": ["ocr"]}, 32),
}


def _watch_blocks(part: nn.Module, block: type[nn.Module]) -> tuple[list[nn.Module], set[int]]:
    """The part's blocks, and the set that collects the index of each block that runs while it is armed.

    A block runs when one of its direct children runs (pre-hooks: a recomputation stops early, once it has
    what the backward pass needs; transformers checkpoints a layer's ``forward``, not its hooks)."""
    blocks = [m for m in part.modules() if type(m) is block]
    assert blocks, f"{type(part).__name__} has no {block.__name__} module"
    ran: set[int] = set()
    for i, m in enumerate(blocks):
        for child in m.children():
            child.register_forward_pre_hook(lambda *_, i=i: ran.add(i))
    return blocks, ran


def _grads_and_runs(build: Callable[[bool], nn.Module], run: Callable[[nn.Module], torch.Tensor],
                    checkpointing: bool) -> tuple[dict[str, torch.Tensor], int, set[int], set[int]]:
    """Parameter gradients of a loss on ``run(part)``, the number of blocks, and the blocks that ran in the
    forward pass and in the backward pass."""
    torch.manual_seed(0)
    part = build(checkpointing).train()
    blocks, ran = _watch_blocks(part, part.fsdp_wrap_block)
    loss = run(part).float().pow(2).mean()
    forward = set(ran)
    ran.clear()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in part.named_parameters() if p.grad is not None}
    return grads, len(blocks), forward, set(ran)


def _assert_same_and_recomputed(build, run) -> None:
    plain, n, fwd, bwd = _grads_and_runs(build, run, False)
    ckpt, _, fwd_c, bwd_c = _grads_and_runs(build, run, True)
    every = set(range(n))
    assert n > 1 and fwd == every and not bwd  # without checkpointing no block runs again
    assert fwd_c == every and bwd_c == every  # with it every block runs again, in the backward pass
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("name", sorted(ENCODER_SECTIONS))
def test_encoder_checkpointing_keeps_gradients_and_recomputes_blocks(name):
    section, size = ENCODER_SECTIONS[name]

    def build(on: bool) -> nn.Module:
        return ENCODERS.build({**section, "gradient_checkpointing": on}, "model.encoders[0]")

    pixels = torch.rand(2, 3, size, size)
    _assert_same_and_recomputed(build, lambda enc: torch.cat([t.flatten(1) for t in enc(pixels).values()], 1))


def test_llm_checkpointing_keeps_gradients_and_recomputes_decoder_layers(demo_dir: Path):
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}

    def build(on: bool) -> nn.Module:
        return LLMS.build({"name": "hf_causal", "tokenizer": str(demo_dir / "tokenizer"), "config": config,
                           "gradient_checkpointing": on}, "model.llm")

    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones_like(ids)
    _assert_same_and_recomputed(build, lambda llm: llm(llm.embed(ids), mask, labels=ids).loss.reshape(1))
