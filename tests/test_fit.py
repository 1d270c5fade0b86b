"""Training through the public API and CLI: stages, run folder, resume, validation, predict."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

import vlkit
from vlkit.cli import main
from vlkit.errors import CheckpointError


class Probe(Callback):
    """Records where a stage starts and its optimizer state at that point."""

    def __init__(self) -> None:
        self.starts: dict[str, tuple[int, dict]] = {}

    def on_train_start(self, trainer, pl_module):
        state = copy.deepcopy(trainer.optimizers[0].state_dict())  # live tensors keep training
        self.starts[pl_module.stage.name] = (trainer.global_step, state)


def test_fit_resumes_from_the_last_checkpoint_with_optimizer_state(tiny_recipe: Path, tmp_path: Path, crash_at):
    recipe = vlkit.load_recipe(tiny_recipe)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        vlkit.fit(recipe, run, callbacks=[crash_at("tune", 3)])
    assert (run / "stage0-align" / "done.json").exists()
    assert not (run / "stage1-tune" / "done.json").exists()
    saved = torch.load(run / "stage1-tune" / "last" / "state.pt", weights_only=True)
    assert saved["global_step"] == 2  # checkpoint_every: 2

    probe = Probe()
    summary = vlkit.fit(vlkit.load_recipe(tiny_recipe), run, callbacks=[probe])
    assert "align" not in probe.starts  # finished stage is skipped
    step, opt_state = probe.starts["tune"]
    assert step == 2
    saved_opt = saved["optimizer_states"][0]["state"]
    assert saved_opt and set(saved_opt) == set(opt_state["state"])
    for k, v in saved_opt.items():
        assert torch.equal(v["exp_avg"], opt_state["state"][k]["exp_avg"])
        assert torch.equal(v["exp_avg_sq"], opt_state["state"][k]["exp_avg_sq"])

    tune = json.loads((run / "stage1-tune" / "done.json").read_text())
    assert tune["steps"] == 4
    # metrics.csv keeps the rows logged before the crash and continues after the resume point
    with open(run / "stage1-tune" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == [0, 1, 2, 3]
    # the summary holds overall and per-type accuracy next to the majority baseline
    written = json.loads((run / "summary.json").read_text())
    assert written["val"] == summary["val"]
    for key in ("val/loss", "val/accuracy", "val/baseline", "val/accuracy/digit", "val/baseline/count"):
        assert key in summary["val"], key
    assert 0.15 < summary["val"]["val/baseline"] < 0.45
    # frozen stage: only the fusion changed between the start and the end of stage 0
    state = vlkit.training.checkpoint.read_weights(run / "stage0-align" / "last")
    assert any(k.startswith("model.fusion.") for k in state)


def test_run_folder_from_another_recipe_is_refused(tiny_recipe: Path, tmp_path: Path):
    run = tmp_path / "run"
    vlkit.fit(vlkit.load_recipe(tiny_recipe, ["stages=[{name: a, trainable: [fusion], max_steps: 1}]"]), run)
    before = (run / "recipe.yaml").read_text()
    with pytest.raises(CheckpointError, match="different recipe"):
        vlkit.fit(vlkit.load_recipe(tiny_recipe, ["stages=[{name: a, trainable: [fusion], max_steps: 2}]"]), run)
    assert (run / "recipe.yaml").read_text() == before
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a vlkit run folder"):
        vlkit.fit(vlkit.load_recipe(tiny_recipe), other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_cli_fit_validate_predict(tiny_recipe: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert main(["fit", str(tiny_recipe), "stages.1.max_steps=2", "--run-dir", str(run)]) == 0
    assert main(["validate", str(run), "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["val/count"] == 32  # eval.max_samples
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64), "red").save(img)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": str(img), "question": "What color is the square?"}) + "\n"
                         + json.dumps({"question": "How many shapes are there?"}) + "\n")
    out = tmp_path / "a.jsonl"
    assert main(["predict", str(run), "--input", str(questions), "--out", str(out), "--max-new-tokens", "3"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question"] for a in answers] == ["What color is the square?", "How many shapes are there?"]
    # the run's latest weights answer, with and without an image in one batch
    expected = vlkit.from_pretrained(run).answer([Image.open(img).convert("RGB"), None],
                                                 [a["question"] for a in answers], max_new_tokens=3)
    assert [a["answer"] for a in answers] == expected
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    capsys.readouterr()
    assert main(["predict", str(run), "--input", str(bad)]) == 2
    assert f"{bad}:1" in capsys.readouterr().err


def test_cli_config_list_and_errors(tiny_recipe: Path, capsys):
    assert main(["config", str(tiny_recipe), "model.fusion.name=token_concat"]) == 0
    out = capsys.readouterr().out
    assert "name: token_concat" in out and "schedule: cosine" in out
    assert main(["list", "fusions"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("linear", "mlp", "token_concat"))
    assert main(["config", str(tiny_recipe), "model.fusion.name=nope"]) == 2
    assert "unknown fusion 'nope'" in capsys.readouterr().err


def test_console_script_help_for_every_command():
    for cmd in ([], ["fit"], ["validate"], ["predict"], ["list"], ["config"], ["sweep"], ["data"], ["data", "demo"],
                ["data", "from-llava"], ["cache-features"], ["mix-weights"]):
        res = subprocess.run([sys.executable, "-m", "vlkit.cli", *cmd, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "usage: vlkit" in res.stdout, (cmd, res.stderr)


def _corrupt_copy(src: Path, dst: Path, bad_image: int, bad_json: int) -> tuple[str, str]:
    """Copy a shard, replacing the image of sample ``bad_image`` and the JSON of sample ``bad_json``."""
    import io
    import tarfile

    keys: list[str] = []
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin:
            data = tin.extractfile(m).read()
            key, ext = m.name.split(".", 1)
            if key not in keys:
                keys.append(key)
            i = keys.index(key)
            if (i == bad_image and ext == "png") or (i == bad_json and ext == "json"):
                data = b"\x89PNG broken" if ext == "png" else b"{not json"
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    return keys[bad_image], keys[bad_json]


def test_fit_skips_and_counts_corrupt_samples_or_fails_fast_when_strict(tiny_recipe: Path, tmp_path: Path,
                                                                        demo_dir: Path, capsys):
    from vlkit.data.shards import _image_bytes, iter_tar_samples

    shard = demo_dir / "train-000000.tar"
    first = next(i for i, (_, f) in enumerate(iter_tar_samples(str(shard))) if _image_bytes(f))
    bad_img, _ = _corrupt_copy(shard, tmp_path / "bad.tar", first, first + 1)
    data = [f"data.train.urls={tmp_path / 'bad.tar'}", "data.train.shuffle_buffer=0",
            "data.train.samples_per_epoch=16", "stages.0.max_steps=2", "stages.1.max_steps=2"]
    vlkit.fit(vlkit.load_recipe(tiny_recipe, data), tmp_path / "run")
    assert "skipped 2 corrupt or invalid training sample(s) this epoch" in capsys.readouterr().err
    with open(tmp_path / "run" / "stage0-align" / "metrics.csv", newline="") as f:
        skipped = [float(r["data/skipped"]) for r in csv.DictReader(f) if r.get("data/skipped")]
    assert skipped and skipped[0] == 2.0
    with pytest.raises(vlkit.errors.DataError, match=rf"bad.tar: sample {bad_img}: cannot decode image"):
        vlkit.fit(vlkit.load_recipe(tiny_recipe, [*data, "data.train.strict=true"]), tmp_path / "strict")


def test_cli_data_demo_builds_once_and_reuses(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    args = ["data", "demo", "--out", str(out), "--train-scenes", "20", "--val-scenes", "10"]
    assert main(args) == 0
    assert "demo dataset written" in capsys.readouterr().out
    stamp = (out / "index.json").stat().st_mtime_ns
    assert main(args) == 0
    assert "reusing it" in capsys.readouterr().out
    assert (out / "index.json").stat().st_mtime_ns == stamp
    # other arguments: refused (the folder holds another dataset), nothing is overwritten
    assert main([*args[:-1], "11"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "index.json").stat().st_mtime_ns == stamp


def test_cli_data_from_llava(tmp_path: Path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), "blue").save(images / "a.png")
    entries = [{"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "b", "image": "missing.png", "conversations": [
            {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "data.json").write_text(json.dumps(entries))
    assert main(["data", "from-llava", str(tmp_path / "data.json"), str(images), "--out", str(tmp_path / "out")]) == 0
    assert "train: 1 samples" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["train-000000.tar"]
