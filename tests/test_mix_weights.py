"""Weight mixing: endpoints, midpoint, linearity, dtype, refusals, and every input kind (run folder, stage
checkpoint, Hugging Face folder single/sharded, .safetensors file), through the API and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import vlkit
from vlkit.cli import main
from vlkit.errors import CheckpointError
from vlkit.training.checkpoint import SafetensorsCheckpointIO
from vlkit.training.fit import MODEL_PREFIX, load_run
from vlkit.training.mix import mix_tensor, mix_weights


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w32": torch.randn(4, 3, generator=g),
        "w16": torch.randn(5, generator=g).to(torch.bfloat16),
        "h16": torch.randn(2, 2, generator=g).to(torch.float16),
        "steps": torch.tensor([7], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors(0), str(a))
    save_file(tensors(1), str(b))
    return a, b


def mixed_file(a: Path, b: Path, beta: float, out: Path, **kwargs) -> dict[str, torch.Tensor]:
    return load_file(str(mix_weights(a, b, beta, out, **kwargs)))


# --------------------------------------------------------------------------------------------- the math


def test_endpoints_midpoint_and_dtype(files, tmp_path: Path):
    a, b = files
    ta, tb = load_file(str(a)), load_file(str(b))
    one = mixed_file(a, b, 1.0, tmp_path / "one.safetensors")
    zero = mixed_file(a, b, 0.0, tmp_path / "zero.safetensors")
    half = mixed_file(a, b, 0.5, tmp_path / "half.safetensors")
    for key in ta:
        assert one[key].dtype == zero[key].dtype == half[key].dtype == ta[key].dtype, key  # bf16 in, bf16 out
        assert torch.equal(one[key], ta[key]) and torch.equal(zero[key], tb[key]), key
    for key in ("w32", "w16", "h16"):
        expected = ((ta[key].float() + tb[key].float()) / 2).to(ta[key].dtype)
        torch.testing.assert_close(half[key], expected, rtol=0, atol=0)
    assert torch.equal(half["steps"], ta["steps"]) and torch.equal(half["mask"], ta["mask"])


def test_linear_in_beta(files, tmp_path: Path):
    a, b = files
    ta, tb = load_file(str(a)), load_file(str(b))
    for beta in (0.1, 0.25, 0.7, 0.9):
        m = mixed_file(a, b, beta, tmp_path / f"m{beta}.safetensors")
        torch.testing.assert_close(m["w32"], tb["w32"] + beta * (ta["w32"] - tb["w32"]), rtol=1e-6, atol=1e-6)
    # affine: m(x) - m(y) is proportional to x - y
    m1, m2, m3 = (mixed_file(a, b, x, tmp_path / f"l{x}.safetensors")["w32"] for x in (0.2, 0.4, 0.8))
    torch.testing.assert_close(m3 - m1, 3 * (m2 - m1), rtol=1e-5, atol=1e-6)


def test_mix_tensor_computes_in_float32_and_checks_integers():
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    b = torch.tensor([3.0, 5.0], dtype=torch.bfloat16)
    assert mix_tensor(a, b, 0.25).dtype == torch.bfloat16
    torch.testing.assert_close(mix_tensor(a, b, 0.25), torch.tensor([2.5, 4.25], dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match="integer/bool tensor 'n' differs"):
        mix_tensor(torch.tensor([1]), torch.tensor([2]), 0.5, "n")


# ----------------------------------------------------------------------------------------------- refusals


def test_refuses_mismatched_keys_shapes_and_integers(files, tmp_path: Path):
    a, _ = files
    extra = tmp_path / "extra.safetensors"
    save_file({**tensors(1), "bias": torch.zeros(3)}, str(extra))
    with pytest.raises(CheckpointError, match=r"do not hold the same tensors; only in B: bias"):
        mix_weights(a, extra, 0.5, tmp_path / "o1.safetensors")
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in tensors(1).items() if k != "w16"}, str(missing))
    with pytest.raises(CheckpointError, match=r"only in A: w16"):
        mix_weights(a, missing, 0.5, tmp_path / "o2.safetensors")
    shaped = tmp_path / "shaped.safetensors"
    save_file({**tensors(1), "w32": torch.zeros(3, 4)}, str(shaped))
    with pytest.raises(CheckpointError, match=r"differ in tensor shapes: w32 \[4, 3\] vs \[3, 4\]"):
        mix_weights(a, shaped, 0.5, tmp_path / "o3.safetensors")
    counted = tmp_path / "counted.safetensors"
    save_file({**tensors(1), "steps": torch.tensor([8])}, str(counted))
    with pytest.raises(CheckpointError, match=r"integer/bool tensor 'steps' differs"):
        mix_weights(a, counted, 0.5, tmp_path / "o4.safetensors")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())  # nothing written on refusal


def test_refuses_existing_or_overlapping_output_and_bad_beta(files, tmp_path: Path):
    a, b = files
    out = tmp_path / "mix.safetensors"
    mix_weights(a, b, 0.5, out)
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        mix_weights(a, b, 0.3, out)
    mix_weights(a, b, 1.0, out, overwrite=True)
    assert torch.equal(load_file(str(out))["w32"], load_file(str(a))["w32"])
    with pytest.raises(CheckpointError, match="overlaps the input"):
        mix_weights(a, b, 0.5, a, overwrite=True)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        mix_weights(a, b, 1.5, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        mix_weights(tmp_path / "nope.safetensors", b, 0.5, tmp_path / "y.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no weights to mix"):
        mix_weights(tmp_path / "empty", b, 0.5, tmp_path / "z")


def test_file_into_folder(files, tmp_path: Path):
    a, b = files
    out = mix_weights(a, b, 0.5, tmp_path / "mixed")
    assert (out / "a.safetensors").is_file()
    info = json.loads((out / "mix.json").read_text())
    assert info["beta"] == 0.5 and info["kind_a"] == "file"


# ------------------------------------------------------------------------------------ vlkit run checkpoints


def make_run(tiny_recipe: Path, run_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """A vlkit run folder as `vlkit fit` writes it (recipe.yaml + stage checkpoints via the same writer)."""
    recipe = vlkit.load_recipe(tiny_recipe)
    torch.manual_seed(seed)
    model = vlkit.build_model(recipe)
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    state = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    io = SafetensorsCheckpointIO()
    for i, stage in enumerate(recipe.stages):
        io.save_checkpoint({"state_dict": state, "global_step": i}, run_dir / f"stage{i}-{stage.name}" / "last")
    return model.state_dict()


def test_run_checkpoints_mix_and_only_llm(tiny_recipe: Path, tmp_path: Path):
    sa = make_run(tiny_recipe, tmp_path / "runA", 0)
    sb = make_run(tiny_recipe, tmp_path / "runB", 1)
    out = mix_weights(tmp_path / "runA", tmp_path / "runB", 0.5, tmp_path / "mixed")
    assert (out / "recipe.yaml").is_file() and (out / "stage1-tune" / "last" / "model.safetensors").is_file()
    assert not (out / "stage1-tune" / "last" / "state.pt").exists()  # A's optimizer state does not fit the mix
    _, model = load_run(out)  # the mixed run folder works like a trained one (validate / predict)
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (sa[key] + sb[key]) / 2, msg=key)
    # A's file metadata (vlkit's tied-weight aliases) is carried over unchanged
    with safe_open(str(tmp_path / "runA" / "stage1-tune" / "last" / "model.safetensors"), "pt") as fa, \
            safe_open(str(out / "stage1-tune" / "last" / "model.safetensors"), "pt") as fo:
        assert fo.metadata() == fa.metadata() and "vlkit_aliases" in fo.metadata()

    only = mix_weights(tmp_path / "runA" / "stage1-tune" / "last", tmp_path / "runB", 0.25, tmp_path / "only",
                       only="llm")
    state = load_file(str(only / "model.safetensors"))
    llm_keys = [k for k in state if k.startswith("model.llm.")]
    assert llm_keys and len(llm_keys) < len(state)
    for key, value in state.items():
        name = key.removeprefix(MODEL_PREFIX)
        expected = 0.25 * sa[name] + 0.75 * sb[name] if key in llm_keys else sa[name]
        torch.testing.assert_close(value, expected, msg=key)
    with pytest.raises(CheckpointError, match=r"--only lm matches no tensor.*parts are encoders.clip, fusion, llm"):
        mix_weights(tmp_path / "runA", tmp_path / "runB", 0.5, tmp_path / "bad", only="lm")


def test_run_with_another_architecture_is_refused(tiny_recipe: Path, tmp_path: Path):
    make_run(tiny_recipe, tmp_path / "runA", 0)
    other = tmp_path / "other.yaml"
    other.write_text(tiny_recipe.read_text().replace("projector: mlp2x_gelu", "projector: mlp3x_gelu"))
    make_run(other, tmp_path / "runB", 0)
    with pytest.raises(CheckpointError, match=r"only in B: model.fusion.projector.4"):
        mix_weights(tmp_path / "runA", tmp_path / "runB", 0.5, tmp_path / "mixed")
    mix_weights(tmp_path / "runA", tmp_path / "runB", 0.5, tmp_path / "llm_only", only=["llm"])  # LLMs match


# -------------------------------------------------------------------------------------- Hugging Face folders


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


@pytest.mark.parametrize("shard", [None, "4KB"])
def test_hugging_face_folders(tmp_path: Path, shard: str | None):
    kwargs = {"max_shard_size": shard} if shard else {}
    a, b = tiny_llama(0), tiny_llama(1)
    a.save_pretrained(tmp_path / "a", **kwargs)
    b.save_pretrained(tmp_path / "b", **kwargs)
    if shard:
        assert (tmp_path / "a" / "model.safetensors.index.json").is_file()
    out = mix_weights(tmp_path / "a", tmp_path / "b", 0.5, tmp_path / "mixed")
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        p.name for p in out.iterdir() if p.name != "mix.json")
    mixed = LlamaForCausalLM.from_pretrained(out)
    assert mixed.dtype == torch.bfloat16
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in mixed.state_dict().items():
        expected = ((sa[key].float() + sb[key].float()) / 2).to(torch.bfloat16)
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    ends = mix_weights(tmp_path / "a", tmp_path / "b", 0.0, tmp_path / "zero")
    for key, value in LlamaForCausalLM.from_pretrained(ends).state_dict().items():
        assert torch.equal(value, sb[key]), key


def test_sharded_and_single_file_folders_mix(tmp_path: Path):
    """A and B may store the same tensors differently (one file vs shards)."""
    tiny_llama(0).save_pretrained(tmp_path / "a", max_shard_size="4KB")
    tiny_llama(1).save_pretrained(tmp_path / "b")
    out = mix_weights(tmp_path / "a", tmp_path / "b", 1.0, tmp_path / "mixed")
    a = LlamaForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    for key, value in LlamaForCausalLM.from_pretrained(out).state_dict().items():
        assert torch.equal(value, a[key]), key


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_mix_weights(files, tmp_path: Path, tiny_recipe: Path, capsys):
    a, b = files
    out = tmp_path / "cli.safetensors"
    assert main(["mix-weights", str(a), str(b), "--beta", "0.25", "--out", str(out)]) == 0
    assert "0.25 * A + 0.75 * B" in capsys.readouterr().out
    torch.testing.assert_close(load_file(str(out))["w32"],
                               0.25 * load_file(str(a))["w32"] + 0.75 * load_file(str(b))["w32"])
    assert main(["mix-weights", str(a), str(b), "--out", str(out)]) == 2
    assert "already exists" in " ".join(capsys.readouterr().err.split())  # rich may wrap long lines
    assert main(["mix-weights", str(a), str(b), "--out", str(out), "--overwrite"]) == 0
    with pytest.raises(SystemExit):
        main(["mix-weights", str(a), str(b), "--beta", "1.5", "--out", str(tmp_path / "x")])
    assert "must be in [0, 1]" in " ".join(capsys.readouterr().err.split())

    sa = make_run(tiny_recipe, tmp_path / "runA", 0)
    make_run(tiny_recipe, tmp_path / "runB", 1)
    assert main(["mix-weights", str(tmp_path / "runA"), str(tmp_path / "runB"), "--beta", "0.5", "--only", "llm",
                 "--out", str(tmp_path / "cli_run")]) == 0
    _, model = load_run(tmp_path / "cli_run")
    for key, value in model.state_dict().items():
        if not key.startswith("llm."):
            assert torch.equal(value, sa[key]), key
