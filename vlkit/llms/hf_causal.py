"""``hf_causal``: any Hugging Face ``AutoModelForCausalLM`` as the language model of a VLM.

Three ways to get the weights, chosen in the recipe::

    llm: {name: hf_causal, checkpoint: HuggingFaceTB/SmolLM2-135M-Instruct}          # hub id (or cache)
    llm: {name: hf_causal, checkpoint: runs/exp1/llm}                                 # local folder
    llm: {name: hf_causal, checkpoint: models/smol, gguf_file: smol.Q4_1.gguf}        # GGUF, dequantized
    llm: {name: hf_causal, tokenizer: data/demo/tokenizer,                            # random init
          config: {model_type: llama, hidden_size: 128, intermediate_size: 256,
                   num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 4}}

:meth:`HFCausalLM.save_pretrained` writes a folder (safetensors weights, tokenizer, chat template) that
loads back through ``checkpoint:``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vlkit.data.conversation import BUILTIN_TEMPLATES, ChatTemplate, FormatTemplate, get_template
from vlkit.errors import CheckpointError, RecipeError
from vlkit.llms.base import LLM
from vlkit.registry import LLMS
from vlkit.sources import load_error, resolve_source

_KEY = "model.llm"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "name" or "org/name" as the Hub spells repo ids; anything else that does not exist is a missing folder.


def _causal_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@LLMS.register("hf_causal")
class HFCausalLM(LLM):
    """A Hugging Face causal LM (any ``AutoModelForCausalLM``), its tokenizer and chat template.

    Attributes: ``model``, ``tokenizer`` (always with a pad token: its own, else its eos token),
    ``template`` (a :class:`~vlkit.data.conversation.ChatTemplate`), ``fsdp_wrap_block`` (the decoder
    layer class, for FSDP auto-wrapping and activation checkpointing policies; None if unknown).
    """

    @dataclass
    class Args:
        """Recipe arguments of ``hf_causal``. Set exactly one of ``checkpoint`` and ``config``."""

        checkpoint: str | None = None
        """Hub id (``org/name``) or local folder of a pretrained model, loaded with ``from_pretrained``."""
        gguf_file: str | None = None
        """A ``.gguf`` file inside ``checkpoint`` (folder or hub repo), or an absolute path to one (then
        ``checkpoint`` may be left out). Weights are dequantized to ``dtype``; the tokenizer comes from the
        same file unless ``tokenizer`` is set. Needs the ``gguf`` package."""
        config: dict[str, Any] | None = None
        """Inline model config for random init (``model_type`` plus its sizes), passed to
        ``AutoConfig.for_model``. ``vocab_size`` defaults to the tokenizer's length, and the pad/bos/eos
        ids come from the tokenizer."""
        tokenizer: str | None = None
        """Folder or hub id of the tokenizer (default: the checkpoint's). Required with ``config``."""
        chat_template: str = "auto"
        """``auto`` (the tokenizer's own Jinja template) or a built-in: chatml, llama3, phi3, vicuna, plain."""
        dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
        """Parameter dtype (``auto``: the checkpoint's own; float32 for random init). ``bfloat16``/``float16``
        only when the LLM's own weights train in no stage (frozen, or under LoRA adapters, which stay
        float32); a trained LLM stays float32, bf16 compute comes from ``trainer.precision: bf16-mixed``."""
        attn_implementation: str | None = None
        """e.g. ``sdpa``, ``eager``, ``flash_attention_2`` (default: transformers' choice)."""
        trust_remote_code: bool = False
        """Allow model/tokenizer code from the checkpoint (passed to transformers only when true)."""
        gradient_checkpointing: bool = False
        """Recompute decoder activations in the backward pass (less memory, ~30% slower)."""
        load_in: Literal["4bit", "8bit"] | None = None
        """Quantize the pretrained weights at load (bitsandbytes; QLoRA: 4-bit NF4 with double quantization,
        computing in ``dtype``, bfloat16 for ``auto``). Needs CUDA and ``pip install 'vlkit[quant]'``; the
        quantized weights are frozen, so train LoRA adapters on the LLM (``lora: {parts: [llm]}``)."""

        def __post_init__(self) -> None:
            # Checked when the recipe is validated, before anything is loaded.
            if self.load_in is not None:
                _check_quantization(self)
            gguf_abs = self.gguf_file is not None and os.path.isabs(os.path.expanduser(self.gguf_file))
            if self.checkpoint is not None and self.config is not None:
                raise RecipeError("set either `checkpoint` (pretrained weights) or `config` (random init), "
                                  "not both", _KEY)
            if self.checkpoint is None and self.config is None and not gguf_abs:
                raise RecipeError(
                    "set one of `checkpoint` (hub id or folder of a pretrained model) or `config` (inline "
                    "model config for random init, e.g. {model_type: llama, hidden_size: 128, ...})"
                    + (" (a relative `gguf_file` is looked up inside `checkpoint`)" if self.gguf_file else ""),
                    _KEY,
                )
            if self.chat_template != "auto" and self.chat_template not in BUILTIN_TEMPLATES:
                get_template(self.chat_template, None)  # type: ignore[arg-type]  # raises, with suggestions
            if self.config is not None:
                if self.gguf_file is not None:
                    raise RecipeError("`gguf_file` loads pretrained weights: use it with `checkpoint`, not "
                                      "with `config`", f"{_KEY}.gguf_file")
                if not self.tokenizer:
                    raise RecipeError("random init from `config` needs `tokenizer`: a folder or hub id holding "
                                      "the tokenizer (its length sets vocab_size)", f"{_KEY}.tokenizer")
                model_type = self.config.get("model_type")
                known = _causal_model_types()
                if model_type not in known:
                    close = difflib.get_close_matches(str(model_type), known, n=3)
                    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                    what = "missing." if model_type is None else f"{model_type!r} is not a causal-LM model type."
                    raise RecipeError(f"{what}{hint} Causal-LM model types include llama, qwen2, phi3, mistral "
                                      "and gemma2", f"{_KEY}.config.model_type")

    fsdp_wrap_block: type[nn.Module] | None

    def __init__(self, args: Args) -> None:
        super().__init__()
        self.args = args
        extra: dict[str, Any] = {"trust_remote_code": True} if args.trust_remote_code else {}
        source, gguf = _weights_location(args)
        self.tokenizer = _ensure_pad(_load_tokenizer(args, source, gguf, extra))
        if args.config is not None:
            self.model = _random_init(args, self.tokenizer, extra)
        elif gguf is not None:
            self.model = _load_gguf_model(source, gguf, args, extra)
        else:
            model_kwargs = _model_kwargs(args, extra)
            self.model = _from_pretrained(AutoModelForCausalLM, source, "checkpoint", "model", **model_kwargs)
        rows = self.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > rows:
            raise CheckpointError(
                f"{_KEY}: the tokenizer has {len(self.tokenizer)} tokens but the model's embedding table only "
                f"{rows} rows; use the tokenizer that belongs to this model (`tokenizer:`)"
            )
        if args.gradient_checkpointing:
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        self.template: ChatTemplate = get_template(args.chat_template, self.tokenizer)
        self.fsdp_wrap_block = _decoder_layer_class(self.model)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the model (safetensors), tokenizer and chat template so ``checkpoint: folder`` loads them.

        A built-in chat template (e.g. ``vicuna``) is written as the tokenizer's Jinja template, so the
        export renders the same text with ``chat_template: auto`` and in other Hugging Face tools.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        return self.save_tokenizer(folder)

    def save_tokenizer(self, folder: str | Path) -> Path:
        """Write the tokenizer with the chat template this model uses (a built-in one as Jinja)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        own = self.tokenizer.chat_template
        try:
            if isinstance(self.template, FormatTemplate):
                self.tokenizer.chat_template = format_template_to_jinja(self.template, self.tokenizer)
            self.tokenizer.save_pretrained(folder)
        finally:
            self.tokenizer.chat_template = own
        return folder

    def portable_section(self, tokenizer: str) -> dict[str, Any]:
        """The recipe section that rebuilds this LLM's architecture from no file but ``tokenizer`` (a folder
        written by :meth:`save_tokenizer`): the model's own config inline, so weights loaded afterwards
        (vlkit's ``from_pretrained``) need neither the original checkpoint nor a download."""
        config = self.model.config.to_diff_dict()
        for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
                    "quantization_config", "auto_map"):
            config.pop(key, None)
        config["model_type"] = self.model.config.model_type
        dtype = self.args.dtype
        if dtype == "auto":
            dtype = {v: k for k, v in _DTYPES.items()}.get(self.model.dtype, "float32")
        return {"name": "hf_causal", **dataclasses.asdict(self.args), "checkpoint": None, "gguf_file": None,
                "config": config, "tokenizer": tokenizer, "dtype": dtype}


# ----------------------------------------------------------------------------------------------- loading


def _check_source(source: str, field: str) -> str:
    """A local folder or a hub id, as every part resolves ``checkpoint:`` values (:mod:`vlkit.sources`)."""
    return resolve_source(source, f"{_KEY}.{field}", what="folder").target


def _from_pretrained(loader: Any, source: str, field: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(source, **kwargs)`` with missing files turned into a CheckpointError."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        key = f"{_KEY}.{field}"
        raise load_error(resolve_source(source, key), key, what, exc) from exc


def _weights_location(args: HFCausalLM.Args) -> tuple[str | None, str | None]:
    """``(from_pretrained source, gguf_file argument)``; sources are checked, GGUF files looked up."""
    if args.config is not None:
        return None, None
    if args.gguf_file is None:
        return _check_source(args.checkpoint, "checkpoint"), None
    gguf = Path(args.gguf_file).expanduser()
    if gguf.is_absolute():
        if not gguf.is_file():
            raise CheckpointError(f"{_KEY}.gguf_file: file not found: {gguf}")
        return str(gguf.parent), str(gguf)
    source = _check_source(args.checkpoint, "checkpoint")
    if Path(source).is_dir() and not (Path(source) / gguf).is_file():
        present = sorted(p.name for p in Path(source).glob("*.gguf"))
        raise CheckpointError(f"{_KEY}.gguf_file: {args.gguf_file} not found in {source} "
                              f"(.gguf files there: {', '.join(present) or 'none'})")
    return source, args.gguf_file


def _load_tokenizer(args: HFCausalLM.Args, source: str | None, gguf: str | None,
                    extra: dict[str, Any]) -> PreTrainedTokenizerBase:
    if args.tokenizer is not None:
        return _from_pretrained(AutoTokenizer, _check_source(args.tokenizer, "tokenizer"), "tokenizer",
                                "tokenizer", **extra)
    gguf_kwargs = {"gguf_file": gguf} if gguf is not None else {}
    return _from_pretrained(AutoTokenizer, source, "checkpoint", "tokenizer", **gguf_kwargs, **extra)


def _ensure_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token without adding tokens: its own, else eos, else unk."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise CheckpointError(f"{_KEY}.tokenizer: the tokenizer has no pad, eos or unk token to pad with; "
                                  "use a tokenizer that defines an eos token")
        tokenizer.pad_token = fallback
    return tokenizer


def _model_kwargs(args: HFCausalLM.Args, extra: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": _DTYPES.get(args.dtype, args.dtype), **extra}
    if args.attn_implementation is not None:
        kwargs["attn_implementation"] = args.attn_implementation
    if args.load_in is not None:
        from transformers import BitsAndBytesConfig

        compute = _DTYPES.get(args.dtype, torch.bfloat16)
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
            if args.load_in == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return kwargs


def _check_quantization(args: HFCausalLM.Args) -> None:
    """``load_in`` needs pretrained (non-GGUF) weights, CUDA and bitsandbytes: refused with the fix otherwise."""
    import importlib.util

    where = f"{_KEY}.load_in"
    if args.checkpoint is None or args.gguf_file is not None:
        raise RecipeError("`load_in` quantizes a pretrained `checkpoint` (not `config` random init or a "
                          "`gguf_file`)", where)
    if not torch.cuda.is_available():
        raise RecipeError(f"`load_in: {args.load_in}` (bitsandbytes quantization) needs a CUDA GPU and none is "
                          "available; remove `load_in` to train LoRA on the full-precision LLM", where)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(f"`load_in: {args.load_in}` needs bitsandbytes: pip install 'vlkit[quant]'", where)


def _random_init(args: HFCausalLM.Args, tokenizer: PreTrainedTokenizerBase,
                 extra: dict[str, Any]) -> PreTrainedModel:
    cfg = dict(args.config or {})
    model_type = cfg.pop("model_type")
    cfg.setdefault("vocab_size", len(tokenizer))
    if cfg["vocab_size"] < len(tokenizer):
        raise RecipeError(f"vocab_size {cfg['vocab_size']} is smaller than the tokenizer ({len(tokenizer)} "
                          "tokens); leave it out to use the tokenizer's length", f"{_KEY}.config.vocab_size")
    for name in ("pad", "bos", "eos"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            cfg.setdefault(f"{name}_token_id", token_id)
    kwargs = _model_kwargs(args, extra)
    if kwargs["dtype"] == "auto":
        kwargs["dtype"] = torch.float32
    try:
        config = AutoConfig.for_model(model_type, **cfg)
        return AutoModelForCausalLM.from_config(config, **kwargs)
    except (ValueError, TypeError, AssertionError, StrictDataclassError) as exc:
        raise RecipeError(f"cannot build a {model_type} model from this config: {exc}", f"{_KEY}.config") from exc


def _load_gguf_model(source: str, gguf_file: str, args: HFCausalLM.Args,
                     extra: dict[str, Any]) -> PreTrainedModel:
    """A GGUF checkpoint as a plain (dequantized, trainable) model.

    transformers' ``from_pretrained(..., gguf_file=...)`` needs ``accelerate``; without it the same
    transformers GGUF reader fills a model built from the file's config.
    """
    from transformers.utils import is_accelerate_available

    kwargs = _model_kwargs(args, extra)
    if is_accelerate_available():
        from transformers import GgufConfig

        model = _from_pretrained(AutoModelForCausalLM, source, "checkpoint", "model", gguf_file=gguf_file,
                                 quantization_config=GgufConfig(dequantize=True), **kwargs)
        return _drop_quantizer(model)
    return _load_gguf_without_accelerate(source, gguf_file, kwargs)


def _load_gguf_without_accelerate(source: str, gguf_file: str, kwargs: dict[str, Any]) -> PreTrainedModel:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import cached_file

    config = _from_pretrained(AutoConfig, source, "checkpoint", "model config", gguf_file=gguf_file,
                              **({"trust_remote_code": True} if kwargs.get("trust_remote_code") else {}))
    if kwargs.get("dtype") == "auto":
        kwargs = {**kwargs, "dtype": torch.float32}
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    path = gguf_file if os.path.isabs(gguf_file) else cached_file(source, gguf_file)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model,
                                   torch_dtype=kwargs["dtype"])["tensors"]
    missing, _ = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing:
        raise CheckpointError(f"{_KEY}.gguf_file: {gguf_file} lacks {len(missing)} weights of the model "
                              f"(e.g. {missing[:3]})")
    return model


def _drop_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """After a full dequantization the model is a plain one: make it trainable and saveable as such."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def _decoder_layer_class(model: PreTrainedModel) -> type[nn.Module] | None:
    """The class named in ``_no_split_modules`` (the decoder layer), else the repeated block class."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in names:
            return type(module)
    blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if blocks:
        biggest = max(blocks, key=lambda m: sum(p.numel() for p in m.parameters()))
        return type(biggest[0])
    return None


# ------------------------------------------------------------------------------------------------ export


def format_template_to_jinja(template: FormatTemplate, tokenizer: PreTrainedTokenizerBase) -> str:
    """A Jinja chat template that renders exactly the text of a built-in :class:`FormatTemplate`.

    Written into exported tokenizers, so ``apply_chat_template`` (and ``chat_template: auto``) reproduce
    the format the model was trained with.
    """

    def lit(text: str) -> str:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

    def turn(fmt: str, content: str) -> str:
        before, sep, after = template._fmt(fmt, tokenizer, "\x00").partition("\x00")
        return lit(before) + ("{{ " + content + " }}" if sep else "") + lit(after)

    prefix = lit(template._fmt(template.assistant_prefix, tokenizer))
    parts = [lit(template._fmt(template.bos, tokenizer))]
    if template.default_system is not None:
        parts.append("{% if messages|length == 0 or messages[0]['role'] != 'system' %}"
                     + lit(template._fmt(template.system, tokenizer, template.default_system)) + "{% endif %}")
    parts.append(
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}" + turn(template.system, "message['content']")
        + "{% elif message['role'] == 'user' %}" + turn(template.user, "message['content']")
        + "{% elif message['role'] == 'assistant' %}" + prefix + "{{ message['content'] }}"
        + lit(template._fmt(template.assistant_suffix, tokenizer))
        + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + prefix + "{% endif %}"
    )
    return "".join(parts)
