"""``--format llava``: a vlkit model as transformers' ``LlavaForConditionalGeneration``, and back.

A model maps onto LLaVA when it is one open_clip ViT (``clip`` encoder) + a ``linear`` or ``mlp2x_gelu``
projector (``linear`` / ``mlp`` fusion) + a Hugging Face causal LM, without views. The export folder
loads with ``AutoModelForImageTextToText`` / ``AutoProcessor`` / ``pipeline("image-text-to-text")``:

- vision tower: ``CLIPVisionModel`` weights converted from open_clip (fused ``in_proj`` split into
  ``q/k/v_proj``, ``ln_pre`` -> ``pre_layrnorm``, ...). vlkit prunes the blocks after its feature layer, so
  the tower keeps exactly those blocks and ``vision_feature_layer`` is -1; ``keep_cls`` maps to
  ``vision_feature_select_strategy`` (``full`` keeps CLS, ``default`` drops it);
- projector: ``mlp2x_gelu`` -> ``linear_1``/GELU/``linear_2``; ``linear`` -> ``linear_1``, identity activation
  and an identity ``linear_2`` (exact);
- tokenizer: ``<image>`` added (the embedding table grows by a row when the LM has no spare one; the row is
  never read, and ``generation_config.suppress_tokens`` keeps it out of answers), vlkit's chat template, and
  a processor template that renders ``[{"type": "image"}, {"type": "text"}]`` content as vlkit does
  (``<image>\\n`` before the text);
- image processor: vlkit's resize policy (``resize``: bicubic stretch; ``pad``: LLaVA's pad-to-square with
  the mean colour) at the encoder's size, its mean/std.

:func:`load_llava` reads such a folder (or any CLIP-ViT LLaVA folder, e.g. ``llava-hf/llava-1.5-7b-hf``
downloaded) back into a vlkit model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlkit.data.conversation import IMAGE_PLACEHOLDER
from vlkit.errors import CheckpointError
from vlkit.weights import load_complete_state

if TYPE_CHECKING:
    from torch import nn

    from vlkit.model import VLM

_PROJECTORS = {"linear": "linear", "mlp2x_gelu": "gelu"}
"""vlkit projector -> LLaVA ``projector_hidden_act`` (``linear`` gets an identity ``linear_2``)."""
_PROCESSOR_TEMPLATE_PREFIX = (
    "{%- set vlkit_ns = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set vlkit_ns.messages = vlkit_ns.messages + [message] -%}"
    "{%- else -%}"
    "{%- set vlkit_text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set vlkit_text.value = vlkit_text.value + '" + IMAGE_PLACEHOLDER
    + "\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set vlkit_text.value = vlkit_text.value + part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set vlkit_ns.messages = vlkit_ns.messages + [{'role': message['role'], 'content': vlkit_text.value}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = vlkit_ns.messages %}"
)
"""Prepended to the LLM's own chat template: list contents become the strings vlkit trains on."""


def _refuse(reason: str) -> CheckpointError:
    return CheckpointError(f"cannot export to --format llava: {reason}; use the vlkit format "
                           "(vlkit export RUN --out DIR), which saves every architecture")


# ------------------------------------------------------------------------------------------ vision tower


def _open_clip_to_hf(encoder: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """open_clip ViT (vlkit's ``clip`` encoder) -> (CLIPVisionConfig kwargs, CLIPVisionModel state dict,
    ``vision_feature_select_strategy``)."""
    from open_clip.transformer import QuickGELU

    visual = encoder.visual
    blocks = list(visual.transformer.resblocks)
    if getattr(visual, "class_embedding", None) is None:
        raise _refuse("the open_clip tower has no class token, and transformers' CLIP vision model always has one")
    if not isinstance(visual.ln_pre, torch.nn.LayerNorm) or visual.conv1.bias is not None:
        raise _refuse("the open_clip tower has no pre-norm (or a patch bias), unlike transformers' CLIP")
    first = blocks[0]
    act = first.mlp.gelu
    if isinstance(act, QuickGELU):
        hidden_act = "quick_gelu"
    elif isinstance(act, torch.nn.GELU) and act.approximate == "none":
        hidden_act = "gelu"
    else:
        raise _refuse(f"the tower's MLP activation {type(act).__name__} has no transformers CLIP equivalent")
    for i, block in enumerate(blocks):
        if not isinstance(block.attn, torch.nn.MultiheadAttention):
            raise _refuse(f"block {i} uses open_clip's custom attention ({type(block.attn).__name__}); transformers' "
                          "CLIP has plain multi-head attention")
        if not (isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)):
            raise _refuse(f"block {i} uses layer scale, which transformers' CLIP does not have")
        if not isinstance(block.ln_1, torch.nn.LayerNorm) or not isinstance(block.ln_2, torch.nn.LayerNorm):
            raise _refuse(f"block {i} has no LayerNorm pre-norms")
    width = visual.transformer.width
    size, patch = visual.image_size[0], visual.patch_size[0]
    if visual.positional_embedding.shape[0] != visual.grid_size[0] * visual.grid_size[1] + 1:
        raise _refuse("the position embedding does not cover the class token plus the patch grid")
    config = {
        "hidden_size": width, "intermediate_size": first.mlp.c_fc.out_features, "num_hidden_layers": len(blocks),
        "num_attention_heads": first.attn.num_heads, "num_channels": 3, "image_size": size, "patch_size": patch,
        "hidden_act": hidden_act, "layer_norm_eps": first.ln_1.eps, "projection_dim": width,
        "attention_dropout": 0.0,
    }
    pre = ""  # keys of transformers' CLIP vision transformer (LLaVA's vision_tower)
    state = {
        f"{pre}embeddings.class_embedding": visual.class_embedding,
        f"{pre}embeddings.patch_embedding.weight": visual.conv1.weight,
        f"{pre}embeddings.position_embedding.weight": visual.positional_embedding,
        f"{pre}pre_layrnorm.weight": visual.ln_pre.weight,
        f"{pre}pre_layrnorm.bias": visual.ln_pre.bias,
        # vlkit pruned the final norm (LLaVA reads the encoder's hidden states, not the pooled output)
        f"{pre}post_layernorm.weight": torch.ones(width, dtype=visual.ln_pre.weight.dtype),
        f"{pre}post_layernorm.bias": torch.zeros(width, dtype=visual.ln_pre.weight.dtype),
    }
    for i, block in enumerate(blocks):
        out = f"{pre}encoder.layers.{i}."
        q, k, v = (t.clone() for t in block.attn.in_proj_weight.detach().chunk(3, dim=0))  # own storage each
        qb, kb, vb = (t.clone() for t in block.attn.in_proj_bias.detach().chunk(3, dim=0))
        state.update({
            f"{out}self_attn.q_proj.weight": q, f"{out}self_attn.q_proj.bias": qb,
            f"{out}self_attn.k_proj.weight": k, f"{out}self_attn.k_proj.bias": kb,
            f"{out}self_attn.v_proj.weight": v, f"{out}self_attn.v_proj.bias": vb,
            f"{out}self_attn.out_proj.weight": block.attn.out_proj.weight,
            f"{out}self_attn.out_proj.bias": block.attn.out_proj.bias,
            f"{out}layer_norm1.weight": block.ln_1.weight, f"{out}layer_norm1.bias": block.ln_1.bias,
            f"{out}mlp.fc1.weight": block.mlp.c_fc.weight, f"{out}mlp.fc1.bias": block.mlp.c_fc.bias,
            f"{out}mlp.fc2.weight": block.mlp.c_proj.weight, f"{out}mlp.fc2.bias": block.mlp.c_proj.bias,
            f"{out}layer_norm2.weight": block.ln_2.weight, f"{out}layer_norm2.bias": block.ln_2.bias,
        })
    strategy = "full" if encoder.args.keep_cls else "default"
    return config, state, strategy


_VISION_EXPORTERS = {"clip": _open_clip_to_hf}
"""Registered encoder name -> converter to transformers' CLIP vision model."""


def _hf_to_open_clip(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`_open_clip_to_hf` for the first ``layers`` blocks (keys relative to ``visual.``)."""
    pre = ""
    out = {
        "class_embedding": state[f"{pre}embeddings.class_embedding"],
        "conv1.weight": state[f"{pre}embeddings.patch_embedding.weight"],
        "positional_embedding": state[f"{pre}embeddings.position_embedding.weight"],
        "ln_pre.weight": state[f"{pre}pre_layrnorm.weight"],
        "ln_pre.bias": state[f"{pre}pre_layrnorm.bias"],
    }
    for i in range(layers):
        src, dst = f"{pre}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        out[f"{dst}attn.in_proj_weight"] = torch.cat([state[f"{src}self_attn.{n}_proj.weight"] for n in "qkv"])
        out[f"{dst}attn.in_proj_bias"] = torch.cat([state[f"{src}self_attn.{n}_proj.bias"] for n in "qkv"])
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{dst}{a}.weight"] = state[f"{src}{b}.weight"]
            out[f"{dst}{a}.bias"] = state[f"{src}{b}.bias"]
    return out


# ------------------------------------------------------------------------------------------------ checks


def _check(model: VLM) -> tuple[str, nn.Module, str]:
    """``(encoder key, encoder, projector spec)`` of a model that maps onto LLaVA; else a CheckpointError
    saying why not."""
    encoders = dict(model.encoders.items())
    names = {k: getattr(type(e), "registered_name", type(e).__name__) for k, e in encoders.items()}
    if model.fusion is None:
        raise _refuse(f"{', '.join(names.values())} embeds the whole sequence itself (no projector onto the LLM's "
                      "embeddings), which LLaVA cannot express")
    if getattr(model, "views", None) is not None:
        raise _refuse("the model encodes multi-scale views (a global view + sub-images); LLaVA encodes one view")
    if len(encoders) != 1:
        raise _refuse(f"the model has {len(encoders)} encoders ({', '.join(names.values())}); LLaVA has one")
    (key, encoder), = encoders.items()
    streams = list(encoder.stream_dims)
    fusion_name = getattr(type(model.fusion), "registered_name", type(model.fusion).__name__)
    if len(streams) != 1:
        raise _refuse(f"{fusion_name} has {len(streams)} input streams ({', '.join(streams)}); LLaVA's projector "
                      "reads one")
    if names[key] not in _VISION_EXPORTERS:
        raise _refuse(f"encoder {names[key]!r} has no transformers LLaVA vision tower (supported: "
                      f"{', '.join(_VISION_EXPORTERS)})")
    spec_of = getattr(model.fusion, "projector_spec", None)
    spec = spec_of() if callable(spec_of) else None
    if fusion_name not in ("linear", "mlp") or spec not in _PROJECTORS:
        raise _refuse(f"fusion {fusion_name!r} (projector {spec!r}) is not LLaVA's projector (linear or "
                      "mlp2x_gelu over one stream)")
    if not hasattr(model.llm, "model") or not hasattr(model.llm.model, "config"):
        raise _refuse("the LLM is not a Hugging Face causal LM")
    return key, encoder, spec


def _image_processor(model: VLM, encoder: nn.Module) -> Any:
    """The transformers image processor that delivers vlkit's pixels (PIL resampling, like vlkit's)."""
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil
    from transformers.image_utils import PILImageResampling

    processor = model.processor()
    policy = getattr(processor, "resize_policy", "resize")
    pre = encoder.preprocess
    if model.image_size != pre.size:
        raise _refuse(f"images are delivered at {model.image_size} px but the encoder takes {pre.size} px (two "
                      "resizes)")
    common = {"size": {"height": pre.size, "width": pre.size}, "do_resize": True, "do_center_crop": False,
              "resample": PILImageResampling.BICUBIC, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": list(pre.mean), "image_std": list(pre.std),
              "do_convert_rgb": True}
    if policy == "resize":
        return CLIPImageProcessorPil(**common)
    if policy == "pad":
        fill = tuple(getattr(processor, "pad_color", ()))
        if fill != tuple(int(m * 255) for m in pre.mean):
            raise _refuse(f"images are padded with {fill}, LLaVA's image processor pads with the mean colour")
        return LlavaImageProcessorPil(do_pad=True, **common)
    raise _refuse(f"resize policy {policy!r} (crop, then resize) has no exact transformers image processor")


# ------------------------------------------------------------------------------------------------ export


def _language_state(llm_model: nn.Module, rows: int) -> dict[str, torch.Tensor]:
    """The causal LM's weights under LLaVA's names, embedding table and head grown to ``rows`` rows."""
    prefix = llm_model.base_model_prefix
    grow = {id(llm_model.get_input_embeddings().weight)}
    head = llm_model.get_output_embeddings()
    if head is not None:
        grow.add(id(head.weight))
    params = dict(llm_model.named_parameters(remove_duplicate=False))
    state = {}
    for name, tensor in llm_model.state_dict(keep_vars=True).items():
        tensor = tensor.detach()
        if id(params.get(name)) in grow and tensor.shape[0] < rows:
            tensor = torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])
        new = f"model.language_model.{name[len(prefix) + 1:]}" if name.startswith(f"{prefix}.") else name
        state[new] = tensor
    return state


def _tokenizer_with_image_token(model: VLM, folder: Path) -> Any:
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    save = getattr(model.llm, "save_tokenizer", None)
    if save is not None:
        save(folder)
    else:
        model.llm.tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
    tokenizer.padding_side = "left"  # batched generation
    return tokenizer


def export_llava(model: VLM, out: str | Path, *, max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` as a transformers LLaVA folder (config, weights, processor, tokenizer, generation
    config); a CheckpointError says why a model cannot be."""
    from huggingface_hub import save_torch_state_dict
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from vlkit.atomic import atomic_dir

    _, encoder, spec = _check(model)
    image_processor = _image_processor(model, encoder)
    vision_cfg, vision_state, strategy = _VISION_EXPORTERS[type(encoder).registered_name](encoder)
    llm = model.llm.model
    hidden = llm.get_input_embeddings().embedding_dim
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer_with_image_token(model, Path(tmp))
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    rows = max(llm.get_input_embeddings().num_embeddings, image_id + 1)
    text_config = llm.config.__class__.from_dict(llm.config.to_dict())
    text_config.vocab_size = rows
    dtype = next(model.parameters()).dtype
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_cfg), text_config=text_config, image_token_index=image_id,
        image_seq_length=model.num_image_tokens, projector_hidden_act=_PROJECTORS[spec],
        vision_feature_select_strategy=strategy, vision_feature_layer=-1, multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = ["LlavaForConditionalGeneration"]

    projector = model.fusion.projector
    first, last = (projector, None) if spec == "linear" else (projector[0], projector[2])
    state = {f"model.vision_tower.{k}": v for k, v in vision_state.items()}
    state["model.multi_modal_projector.linear_1.weight"] = first.weight
    state["model.multi_modal_projector.linear_1.bias"] = first.bias
    state["model.multi_modal_projector.linear_2.weight"] = (
        last.weight if last is not None else torch.eye(hidden, dtype=first.weight.dtype))
    state["model.multi_modal_projector.linear_2.bias"] = (
        last.bias if last is not None else torch.zeros(hidden, dtype=first.weight.dtype))
    state.update(_language_state(llm, rows))
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in state.items()}

    with torch.device("meta"):  # the reference key set, without allocating the weights
        expected = set(LlavaForConditionalGeneration(config).state_dict())
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing, unexpected = expected - set(state) - tied, set(state) - expected
    if missing or unexpected:
        raise _refuse(f"the converted weights do not match transformers' LLaVA ({sorted(missing)[:3]} missing, "
                      f"{sorted(unexpected)[:3]} unexpected)")
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)

    template = tokenizer.chat_template
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_cfg["patch_size"],
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1, image_token=IMAGE_PLACEHOLDER,
        chat_template=_PROCESSOR_TEMPLATE_PREFIX + template if template else None,
    )
    stop = model.llm.template.stop_token_ids(model.llm.tokenizer)
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop if len(stop) != 1 else stop[0],
        pad_token_id=tokenizer.pad_token_id, suppress_tokens=[image_id], do_sample=False,
    )
    with atomic_dir(out) as folder:
        config.save_pretrained(folder)
        generation.save_pretrained(folder)
        processor.save_pretrained(folder)
        save_torch_state_dict(state, folder, max_shard_size=max_shard_size)
    return Path(out)


# ------------------------------------------------------------------------------------------------ import


def is_llava_folder(folder: str | Path) -> bool:
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "llava"
    except (OSError, ValueError, AttributeError):
        return False


def llava_model_section(folder: str | Path, tokenizer: str | None = None) -> dict[str, Any]:
    """The vlkit ``model:`` section of a LLaVA folder with a CLIP vision tower (read from its config files;
    nothing is downloaded or built). The LLM's tokenizer is read from ``tokenizer`` (default: the folder).

    Configs written as differences from the defaults (as the Hub's ``llava-hf`` ones are) are completed with
    transformers' own ``CLIPVisionConfig`` defaults; the text config keeps its ``model_type``'s defaults."""
    from transformers import CLIPVisionConfig

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    vision, text = cfg.get("vision_config") or {}, dict(cfg.get("text_config") or {})
    where = f"{folder / 'config.json'}"
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"{where}: vision tower {vision.get('model_type')!r} is not a CLIP ViT; vlkit reads "
                              "LLaVA folders with a CLIP vision tower")
    vision = {**CLIPVisionConfig().to_dict(), **vision}
    text.setdefault("model_type", "llama")  # LlavaConfig's default text model
    layers = int(vision["num_hidden_layers"])
    feature_layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(feature_layer, int) or not (-layers <= feature_layer <= layers) or feature_layer == 0:
        raise CheckpointError(f"{where}: vision_feature_layer {feature_layer!r} is not one block's output")
    act = vision.get("hidden_act", "quick_gelu")
    if act not in ("gelu", "quick_gelu") or float(vision.get("layer_norm_eps", 1e-5)) != 1e-5:
        raise CheckpointError(f"{where}: vision activation {act!r} / layer_norm_eps have no open_clip equivalent")
    projector_act = cfg.get("projector_hidden_act", "gelu")
    if projector_act not in ("gelu", "linear") or not cfg.get("multimodal_projector_bias", True):
        raise CheckpointError(f"{where}: projector activation {projector_act!r} is not LLaVA's gelu (mlp2x_gelu) "
                              "or an identity (linear)")
    pre: dict[str, Any] = {}
    if (folder / "processor_config.json").is_file():  # transformers >= 5: the image processor is nested
        pre = json.loads((folder / "processor_config.json").read_text()).get("image_processor") or {}
    if not pre and (folder / "preprocessor_config.json").is_file():
        pre = json.loads((folder / "preprocessor_config.json").read_text())
    width = int(vision["hidden_size"])
    encoder = {
        "name": "clip",
        "config": {
            "embed_dim": width,
            "quick_gelu": act == "quick_gelu",
            "vision_cfg": {"image_size": int(vision["image_size"]), "patch_size": int(vision["patch_size"]),
                           "width": width, "layers": layers,
                           "head_width": width // int(vision["num_attention_heads"]),
                           "mlp_ratio": int(vision["intermediate_size"]) / width},
            "preprocess_cfg": {k: pre[f"image_{k}"] for k in ("mean", "std") if f"image_{k}" in pre},
        },
        "layer": feature_layer if feature_layer < 0 else feature_layer - 1,
        "keep_cls": cfg.get("vision_feature_select_strategy", "default") == "full",
    }
    text = {k: v for k, v in text.items()
            if k not in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype")}
    policy = "pad" if pre.get("do_pad") else "crop" if pre.get("do_center_crop") else "resize"
    return {
        "encoders": [encoder],
        "fusion": {"name": "mlp", "projector": "mlp2x_gelu" if projector_act == "gelu" else "linear"},
        "llm": {"name": "hf_causal", "config": text, "tokenizer": tokenizer or str(folder), "chat_template": "auto"},
        "views": None,
        "resize_policy": policy,
    }


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} not found (LLaVA weights are read from safetensors only)")
        state.update(load_file(str(folder / name)))
    legacy = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
              ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))
    out = {}
    for key, tensor in state.items():  # checkpoints written before transformers 4.52 use the old names
        for old, new in legacy:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = tensor
    return out


def llava_weights(model: VLM, folder: str | Path) -> dict[str, torch.Tensor]:
    """A LLaVA folder's weights under the names of ``model`` (built from :func:`llava_model_section`)."""
    folder = Path(folder)
    state = _read_state(folder)
    (key, encoder), = model.encoders.items()
    layers = len(encoder.visual.transformer.resblocks)
    vision = {k[len("model.vision_tower."):].removeprefix("vision_model."): v for k, v in state.items()
              if k.startswith("model.vision_tower.")}
    out = {f"encoders.{key}.visual.{k}": v for k, v in _hf_to_open_clip(vision, layers).items()}
    w1, b1 = state["model.multi_modal_projector.linear_1.weight"], state["model.multi_modal_projector.linear_1.bias"]
    w2, b2 = state["model.multi_modal_projector.linear_2.weight"], state["model.multi_modal_projector.linear_2.bias"]
    if model.fusion.projector_spec() == "linear":  # an identity activation: fold linear_2 into linear_1
        out["fusion.projector.weight"], out["fusion.projector.bias"] = w2 @ w1, w2 @ b1 + b2
    else:
        out.update({"fusion.projector.0.weight": w1, "fusion.projector.0.bias": b1,
                    "fusion.projector.2.weight": w2, "fusion.projector.2.bias": b2})
    prefix = model.llm.model.base_model_prefix
    for k, v in state.items():
        if k.startswith("model.language_model."):
            out[f"llm.model.{prefix}.{k[len('model.language_model.'):]}"] = v
        elif k.startswith("lm_head."):
            out[f"llm.model.{k}"] = v
    return out


def load_llava(folder: str | Path) -> VLM:
    """A LLaVA folder (CLIP ViT + projector + causal LM) as a vlkit model, in eval mode."""
    from vlkit.io.pretrained import build_from_section

    folder = Path(folder)
    model = build_from_section(llava_model_section(folder))
    load_complete_state(model, llava_weights(model, folder),
                        f"{folder}: the LLaVA weights do not fill the vlkit model")
    return model.eval()
