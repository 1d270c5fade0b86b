"""The LLM interface: a causal LM that reads ``inputs_embeds``, plus its tokenizer and chat template."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vlkit.data.conversation import ChatTemplate


class LLM(nn.Module):
    """Base class of registered LLM backbones, built as ``cls(args)``.

    Attributes: ``model`` (the Hugging Face causal LM), ``tokenizer``, ``template`` (a ChatTemplate).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(B, L, H)``."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        """The causal LM's output. With ``position_ids`` (a packed batch: positions restart at every sample),
        transformers keeps attention within each sample: from the position restarts (no 2D mask is passed)
        it builds a block-diagonal causal mask (sdpa, eager, flex), or runs flash attention's varlen kernel,
        which takes one row, so the rows are flattened into one and the logits reshaped back."""
        if position_ids is None:
            return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                              use_cache=False)
        rows, length = inputs_embeds.shape[:2]
        flat = rows > 1 and "flash" in str(getattr(self.model.config, "_attn_implementation", ""))
        if flat:  # each row starts with a sample whose first label is -100, so no target crosses rows
            inputs_embeds, position_ids = inputs_embeds.reshape(1, rows * length, -1), position_ids.reshape(1, -1)
            labels = None if labels is None else labels.reshape(1, -1)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=None, position_ids=position_ids,
                         labels=labels, use_cache=False)
        if flat:
            out.logits = out.logits.reshape(rows, length, -1)
        return out

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Greedy (by default) continuation of left-padded ``inputs_embeds``; returns new token ids."""
        kwargs.setdefault("do_sample", False)
        return self.model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.template.stop_token_ids(self.tokenizer),
            **kwargs,
        )
