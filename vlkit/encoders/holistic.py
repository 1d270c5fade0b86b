"""``holistic``: HoVLE's holistic embedding module, which embeds image patches *and* text into one space.

A monolithic VLM has no separate vision encoder and projector: one module turns the interleaved sequence
(text tokens, with each image's patches at its ``<image>`` positions) into the LLM's input embeddings::

    image -> patch conv + position embedding -> pixel shuffle 0.5 -> MLP (4C -> C, GELU, C -> C)  ┐
    text ids -> the module's own embedding table (initialised from the LLM's)                     ├-> sequence
    sequence -> L causal pre-norm transformer blocks (RoPE) -> RMSNorm -> the LLM's inputs_embeds  ┘

``hd: true`` moves the pixel shuffle (and the MLP) after the blocks: the blocks see 4x more image tokens,
the LLM still gets the reduced count. Recipe::

    model:
      encoders:
        - {name: holistic, width: 2048, depth: 8, heads: 16, patch_size: 14, image_size: 448}
      fusion: null          # the module feeds the LLM directly
      llm: {name: hf_causal, checkpoint: internlm/internlm2-chat-1_8b, trust_remote_code: true}

:class:`HolisticEncoder` is the interface: it declares ``embeds_sequence = True``, which makes the model use the
``holistic`` embedding strategy (:mod:`vlkit.strategies.holistic`): the encoder receives the token ids as well
as the pixels, and its output is the LLM's whole ``inputs_embeds``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlkit.constants import IMAGE_TOKEN_ID
from vlkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess, VisionEncoder
from vlkit.errors import RecipeError
from vlkit.registry import ENCODERS

# ----------------------------------------------------------------------------------------------- interface


class HolisticEncoder(VisionEncoder):
    """An encoder that embeds the whole interleaved sequence (image patches and text) for the LLM.

    Its declared ``embeds_sequence`` selects the ``holistic`` strategy, which bypasses the fusion and the LLM's
    own embedding table: :meth:`embed_sequence` gives the LLM's ``inputs_embeds`` for every position.
    ``num_tokens`` is the number of ``<image>`` positions per image in the LLM's sequence.
    """

    embeds_sequence: ClassVar[bool] = True
    """Declares that this encoder reads token ids too and embeds the whole sequence (text positions included)."""
    width: int
    """Output channels: must equal the LLM's hidden size."""

    def bind_llm(self, input_embeddings: nn.Embedding) -> None:  # pragma: no cover - abstract
        """Called by :func:`vlkit.build_model` once the LLM exists, with the LLM's input embedding table
        (to size the module's own text table, and optionally to initialise it)."""
        raise NotImplementedError

    def embed_sequence(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                       attention_mask: torch.Tensor | None = None,
                       cache: SequenceCache | None = None) -> torch.Tensor:  # pragma: no cover
        """``(B, L)`` ids (``IMAGE_TOKEN_ID`` at image positions) + ``(n_images, 3, S, S)`` pixels in [0, 1]
        -> ``(B, L, width)``: the LLM's input embedding of every position.

        With a ``cache`` (from :meth:`new_cache`), ``input_ids`` are the positions after those the cache
        holds, ``attention_mask`` covers all positions (cached and new, as for the LLM), and the cache is
        extended with the new ones: the output equals the last ``L`` positions of the whole sequence's."""
        raise NotImplementedError

    def new_cache(self) -> SequenceCache:
        """An empty key/value cache for :meth:`embed_sequence` (generation embeds each new token with it)."""
        return SequenceCache()


class SequenceCache:
    """What a holistic module keeps between generation steps: every block's keys and values of the
    sequence so far, and which of its slots are real tokens (padding masks and rotary positions continue
    from it). vlkit's own, not transformers' ``DynamicCache``: the blocks are vlkit's, and the cache must
    also carry the padding mask and the number of LLM positions it covers."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid: torch.Tensor | None = None
        """``(B, S)`` bool: the cached slots that are real tokens (S = module slots, 4 per image position in
        HD mode)."""
        self.length = 0
        """LLM positions covered (the length of the attention mask so far)."""

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append block ``layer``'s new ``(B, H, T, D)`` keys/values; return all of them (cached + new)."""
        if layer < len(self.keys):
            self.keys[layer] = torch.cat([self.keys[layer], key], dim=2)
            self.values[layer] = torch.cat([self.values[layer], value], dim=2)
        else:
            self.keys.append(key)
            self.values.append(value)
        return self.keys[layer], self.values[layer]


# ------------------------------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (computed in float32), with a learned gain."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).to(x.dtype)


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``(B, T, head_dim)`` for integer ``positions`` ``(B, T)`` (rotate-half layout)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float().unsqueeze(-1) * inv  # (B, T, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, T, D)`` by the angles of ``cos``/``sin`` ``(B, T, D)``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings.

    ``impl``: ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``) or ``xformers``
    (``xformers.ops.memory_efficient_attention``; CUDA only).
    """

    def __init__(self, width: int, heads: int, impl: str) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.impl = impl
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None,
                cache: tuple[SequenceCache, int] | None = None) -> torch.Tensor:
        """``key_mask`` ``(B, S)`` bool marks real (non-padding) keys; None: no padding. ``cache``: (the
        cache, this block's index); the ``T`` queries are then the last of the ``S`` keys."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache[0].update(cache[1], k, v)
        if self.impl == "xformers":
            out = _xformers_attention(q, k, v, key_mask)
        elif key_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_padding_mask(key_mask, t))
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


def _causal_padding_mask(key_mask: torch.Tensor, queries: int | None = None) -> torch.Tensor:
    """``(B, 1, T, S)`` bool for the last ``T = queries`` (default all) of ``S`` positions: query i sees key
    j <= i that is not padding; every query sees itself (so a padding query has one key and no NaN; its
    output is never used)."""
    s = key_mask.shape[1]
    t = s if queries is None else queries
    query = torch.arange(s - t, s, device=key_mask.device)[:, None]  # each query's own index among the keys
    key = torch.arange(s, device=key_mask.device)[None, :]
    causal, eye = key <= query, key == query
    return ((causal & key_mask[:, None, :]) | eye).unsqueeze(1)


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_mask: torch.Tensor | None) -> torch.Tensor:
    """xformers memory-efficient attention on ``(B, H, T, D)`` queries and ``(B, H, S, D)`` keys/values (the
    queries are the last T positions), causal (+ padding) bias."""
    import xformers.ops as xops

    if not q.is_cuda:
        raise RuntimeError("holistic encoder: attn_impl 'xformers' needs CUDA tensors (xformers has no CPU "
                           f"kernels) but the module runs on {q.device}; move the model to a GPU or use "
                           "attn_impl: sdpa")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # xformers layout: (B, T, H, D)
    if key_mask is None:
        bias: Any = xops.LowerTriangularMask()
    else:
        b, t, h, s = q.shape[0], q.shape[1], q.shape[2], k.shape[1]
        allowed = _causal_padding_mask(key_mask, t).expand(b, h, t, s)
        padded = (s + 7) // 8 * 8  # xformers wants the bias' last dimension 8-aligned in memory
        bias = q.new_zeros(b, h, t, padded)[..., :s]
        bias.masked_fill_(~allowed, float("-inf"))
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias).transpose(1, 2)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``, the LLaMA / InternLM2 feed-forward."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm causal transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, width: int, heads: int, hidden: int, eps: float, impl: str) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(width, eps)
        self.attn = Attention(width, heads, impl)
        self.mlp_norm = RMSNorm(width, eps)
        self.mlp = SwiGLU(width, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None,
                cache: tuple[SequenceCache, int] | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, key_mask, cache)
        return x + self.mlp(self.mlp_norm(x))


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """Space-to-depth with ratio 0.5: ``(n, h, w, c)`` -> ``(n, h/2, w/2, 4c)`` (each 2x2 neighbourhood
    becomes one token; the four tokens' channels are concatenated row by row)."""
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"pixel shuffle needs an even patch grid, got {h}x{w}")
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // 2, w // 2, 4 * c)


# ------------------------------------------------------------------------------------------------ encoder


@ENCODERS.register("holistic")
class HolisticEmbedding(HolisticEncoder):
    """HoVLE's holistic embedding module: image patches and text into the LLM's input space (no fusion).

    Stream ``tokens``: the output of a sequence holding only the image, ``(B, num_tokens, width)``.
    """

    @dataclass
    class Args:
        width: int = 2048
        """Channels C of the module; must equal the LLM's hidden size."""
        depth: int = 8
        """Causal transformer blocks L."""
        heads: int = 16
        """Attention heads (``width / heads`` must be even, for the rotary embedding)."""
        mlp_hidden: int | None = None
        """Hidden width of each block's SwiGLU feed-forward (default ``4 * width``)."""
        patch_size: int = 14
        """Pixels per patch side (the patch convolution's kernel and stride)."""
        image_size: int = 448
        """Input side in pixels; ``image_size / patch_size`` must be even (for the pixel shuffle). The
        position embedding is learned at this grid and interpolated (bicubic) for other input sizes."""
        hd: bool = False
        """Pixel shuffle (and its MLP) after the blocks instead of before: 4x image tokens in the module,
        the same reduced count for the LLM (HoVLE-HD)."""
        rope_theta: float = 10000.0
        """Rotary embedding base."""
        norm_eps: float = 1e-6
        attn_impl: Literal["sdpa", "xformers"] = "sdpa"
        """``sdpa``: torch's scaled_dot_product_attention; ``xformers``: xformers' memory-efficient
        attention (needs xformers and a CUDA device; a clear error otherwise, never a silent fallback)."""
        init_text_from_llm: bool = True
        """Copy the LLM's input embedding table into the module's text table when the model is built."""
        mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
        """Per-channel pixel mean (of [0, 1] pixels) subtracted before the patch convolution."""
        std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
        gradient_checkpointing: bool = False
        """Recompute the blocks' activations in the backward pass (less memory, slower)."""
        key: str | None = None
        """Encoder key in the model (default: the registered name, ``holistic``)."""

        def __post_init__(self) -> None:
            problems = []
            for name in ("width", "depth", "heads", "patch_size", "image_size"):
                if getattr(self, name) <= 0:
                    problems.append(f"`{name}` must be positive, got {getattr(self, name)}")
            if problems:
                raise RecipeError("holistic encoder: " + "; ".join(problems))
            if self.width % self.heads or (self.width // self.heads) % 2:
                problems.append(f"`width` ({self.width}) / `heads` ({self.heads}) must be a whole, even head "
                                "width (rotary embeddings rotate channel pairs)")
            grid, rest = divmod(self.image_size, self.patch_size)
            if rest or grid % 2:
                problems.append(f"`image_size` ({self.image_size}) must be an even multiple of `patch_size` "
                                f"({self.patch_size}) so that the patch grid can be pixel-shuffled")
            if self.mlp_hidden is not None and self.mlp_hidden <= 0:
                problems.append(f"`mlp_hidden` must be positive, got {self.mlp_hidden}")
            if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
                problems.append("`mean` and `std` need 3 values each (std > 0)")
            if problems:
                raise RecipeError("holistic encoder: " + "; ".join(problems))

    def __init__(self, args: Args) -> None:
        super().__init__()
        if args.attn_impl == "xformers":
            _check_xformers()
        self.args = args
        c = args.width
        self.width = c
        self.grid = args.image_size // args.patch_size
        self.num_tokens = (self.grid // 2) ** 2
        self.stream_dims = {"tokens": c}
        self.preprocess = Preprocess(size=args.image_size, mean=tuple(args.mean),  # type: ignore[arg-type]
                                     std=tuple(args.std))  # type: ignore[arg-type]
        self.patch_embed = nn.Conv2d(3, c, kernel_size=args.patch_size, stride=args.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, c))
        self.mlp = nn.Sequential(nn.Linear(4 * c, c), nn.GELU(), nn.Linear(c, c))
        self.text_embed: nn.Embedding | None = None  # sized by bind_llm (vocab = the LLM's)
        hidden = args.mlp_hidden or 4 * c
        self.fsdp_wrap_block = Block
        self.blocks = nn.ModuleList(Block(c, args.heads, hidden, args.norm_eps, args.attn_impl)
                                    for _ in range(args.depth))
        self.norm = RMSNorm(c, args.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        scaled = 0.02 / math.sqrt(2 * self.args.depth)  # residual branches' output layers (GPT-2 style)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=scaled)
            nn.init.normal_(block.mlp.w2.weight, std=scaled)

    # ------------------------------------------------------------------------------------------ binding

    def bind_llm(self, input_embeddings: nn.Embedding) -> None:
        """Create the text table with the LLM's vocabulary (rows); copy the LLM's table into it when
        ``init_text_from_llm``. The output norm's gain starts at the RMS of the LLM's embeddings, so the
        LLM receives inputs at the scale it was trained on."""
        weight = input_embeddings.weight.detach()
        rows, dim = weight.shape
        if dim != self.width:
            raise RecipeError(f"holistic encoder: width {self.width} differs from the LLM's hidden size {dim}; "
                              "the module's output is the LLM's input, so set `width` to the hidden size")
        table = nn.Embedding(rows, dim, device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        with torch.no_grad():
            if self.args.init_text_from_llm:
                table.weight.copy_(weight.to(table.weight.dtype))
            else:
                nn.init.normal_(table.weight, std=0.02)
            rms = weight.float().pow(2).mean().sqrt().clamp_min(1e-6)
            self.norm.weight.fill_(float(rms))
        table.weight.requires_grad_(self.pos_embed.requires_grad)
        self.text_embed = table

    # ---------------------------------------------------------------------------------------- forward

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The learned position embedding ``(1, grid_h * grid_w, C)``, bicubically interpolated when the
        patch grid differs from the one it was learned at."""
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.pos_embed
        pos = self.pos_embed.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)

    def image_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised pixels ``(n, 3, H, W)`` -> the image tokens that enter the blocks and the patch grid.

        ``(n, (H/p/2) * (W/p/2), C)`` after pixel shuffle + MLP; with ``hd`` the ``(n, (H/p) * (W/p), C)``
        patch tokens (shuffled after the blocks).
        """
        p = self.args.patch_size
        if pixel_values.shape[-2] % (2 * p) or pixel_values.shape[-1] % (2 * p):
            raise ValueError(f"holistic encoder: input {tuple(pixel_values.shape[-2:])} is not a multiple of "
                             f"2 x patch_size ({2 * p}) pixels per side")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (n, C, gh, gw)
        n, c, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2) + self.position_embedding(gh, gw)
        if not self.args.hd:
            x = self.mlp(pixel_shuffle(x.reshape(n, gh, gw, c)).reshape(n, -1, 4 * c))
        return x, (gh, gw)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised pixels -> ``{"tokens": (B, N, C)}``: the module's output for a sequence holding only
        the image (identical to the image positions of any sequence that starts with it, by causality)."""
        tokens, grid = self.image_tokens(pixel_values)
        n_out = (grid[0] // 2) * (grid[1] // 2)
        ids = torch.full((tokens.shape[0], n_out), IMAGE_TOKEN_ID, dtype=torch.long, device=tokens.device)
        return {"tokens": self._sequence(ids, tokens, grid, None)}

    def embed_sequence(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                       attention_mask: torch.Tensor | None = None,
                       cache: SequenceCache | None = None) -> torch.Tensor:
        """``(B, L)`` ids with ``num_tokens`` ``IMAGE_TOKEN_ID`` positions per image, ``(n_images, 3, S, S)``
        pixels in [0, 1] (resized and normalised here) -> ``(B, L, width)`` LLM input embeddings.

        ``attention_mask`` ``(B, L)`` marks real tokens (padding on either side); positions count real
        tokens only, so left- and right-padded copies of a sequence embed alike. With a ``cache``
        (:meth:`new_cache`) only the new positions run through the blocks, against the cached keys/values:
        ``input_ids`` are the positions after the cached ones (``pixel_values`` their images) and
        ``attention_mask`` covers all of them (cached + new); the cache is extended in place.
        """
        n_slots = int((input_ids == IMAGE_TOKEN_ID).sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image-token positions but no pixel_values were given")
            return self._sequence(input_ids, None, (0, 0), attention_mask, cache)
        tokens, grid = self.image_tokens(self.prepare(pixel_values))
        return self._sequence(input_ids, tokens, grid, attention_mask, cache)

    def _sequence(self, input_ids: torch.Tensor, image: torch.Tensor | None, grid: tuple[int, int],
                  attention_mask: torch.Tensor | None, cache: SequenceCache | None = None) -> torch.Tensor:
        """Run the interleaved sequence through the blocks; ``image`` holds the image tokens in order."""
        if self.text_embed is None:
            raise RuntimeError("holistic encoder: no text embedding table yet; build the model with "
                               "vlkit.build_model (which calls bind_llm with the LLM's embeddings)")
        b, length = input_ids.shape
        device = input_ids.device
        image_mask = input_ids == IMAGE_TOKEN_ID
        past = 0 if cache is None else cache.length
        if attention_mask is not None and attention_mask.shape != (b, past + length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the {b} sequence(s) "
                             f"have {past} cached + {length} new positions; pass the mask of all of them")
        valid = torch.ones_like(image_mask) if attention_mask is None else attention_mask[:, past:].bool()
        n_image = 0 if image is None else image.shape[0] * image.shape[1]
        expand = 4 if self.args.hd else 1  # module slots per LLM image position
        if n_image != int(image_mask.sum()) * expand:
            per_image = 0 if image is None else image.shape[1] // expand
            n_images = 0 if image is None else image.shape[0]
            raise ValueError(f"{n_images} image(s) x {per_image} image tokens do not fill the "
                             f"{int(image_mask.sum())} image-token positions in input_ids; tokenize with the "
                             "model's processor()")
        text = self.text_embed(input_ids.masked_fill(image_mask, 0))
        if expand == 1:
            x = text if image is None else text.masked_scatter(image_mask.unsqueeze(-1), image.to(text.dtype))
            slot_valid = valid
        else:
            # every image position becomes `expand` consecutive slots; each slot knows its source position
            rep = torch.where(image_mask, expand, 1)
            end = rep.cumsum(1)
            slots = int(end[:, -1].max())
            index = torch.arange(slots, device=device).expand(b, slots).contiguous()
            source = torch.searchsorted(end, index, right=True).clamp(max=length - 1)
            in_row = index < end[:, -1:]
            slot_image = image_mask.gather(1, source) & in_row
            slot_valid = valid.gather(1, source) & in_row
            x = text.gather(1, source.unsqueeze(-1).expand(-1, -1, text.shape[-1]))
            if image is not None:
                x = x.masked_scatter(slot_image.unsqueeze(-1), image.to(x.dtype))
        if cache is None:
            positions = (slot_valid.long().cumsum(1) - 1).clamp(min=0)
            key_mask = None if bool(slot_valid.all()) else slot_valid
        else:  # positions continue from the cached real tokens; the queries see the cached keys
            seen = torch.zeros(b, 1, dtype=torch.long, device=device) if cache.valid is None \
                else cache.valid.sum(1, keepdim=True)
            positions = (seen + slot_valid.long().cumsum(1) - 1).clamp(min=0)
            cache.valid = slot_valid if cache.valid is None else torch.cat([cache.valid, slot_valid], dim=1)
            cache.length = past + length
            # the first chunk without padding attends as without a cache (is_causal); later ones need the mask
            key_mask = None if past == 0 and bool(slot_valid.all()) else cache.valid
        cos, sin = rotary(positions, self.width // self.args.heads, self.args.rope_theta)
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, cos, sin, key_mask, (cache, i))
            elif self.args.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, key_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, key_mask)
        if expand > 1:
            start = end - rep  # each position's first slot (a text position's only one)
            out = x.gather(1, start.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            if image is not None:
                n, gh, gw = image.shape[0], grid[0], grid[1]
                merged = pixel_shuffle(x[slot_image].reshape(n, gh, gw, -1)).reshape(n, -1, 4 * self.width)
                out = out.masked_scatter(image_mask.unsqueeze(-1), self.mlp(merged).to(out.dtype))
            x = out
        return self.norm(x)


def _check_xformers() -> None:
    """Raise a RecipeError saying why ``attn_impl: xformers`` cannot run here."""
    try:
        import xformers.ops  # noqa: F401
    except ImportError as exc:
        raise RecipeError(f"holistic encoder: attn_impl 'xformers' needs the xformers package, which cannot "
                          f"be imported ({exc}); install it (pip install xformers) or use attn_impl: sdpa") from None
    if not torch.cuda.is_available():
        raise RecipeError("holistic encoder: attn_impl 'xformers' needs a CUDA device (xformers has no CPU "
                          "kernels) and none is available; use attn_impl: sdpa here")
