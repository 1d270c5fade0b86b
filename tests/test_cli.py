"""The command line starts fast (no torch / transformers for help and listing) and documents the parts."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from vlkit.cli import build_parser, main

HEAVY = ("torch", "transformers", "lightning", "omegaconf", "open_clip", "timm")

PROBE = """
import json, sys
from vlkit.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(json.loads(sys.stdin.read())))
print('\\nHEAVY=' + json.dumps(heavy))
"""


def _probe(*args: str) -> tuple[str, list[str]]:
    res = subprocess.run([sys.executable, "-c", PROBE, *args], input=json.dumps(HEAVY), capture_output=True,
                         text=True, env={"COLUMNS": "200", "PATH": "", "HF_HUB_OFFLINE": "1"} | _pythonpath())
    assert res.returncode == 0, res.stderr
    out, _, heavy = res.stdout.rpartition("\nHEAVY=")
    return out, json.loads(heavy)


def _pythonpath() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME", "VIRTUAL_ENV")}


def _commands() -> list[list[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    cmds = []
    for name, p in sub.choices.items():
        cmds.append([name, "--help"])
        nested = [a for a in p._actions if a.dest == "data_command"]
        cmds += [[name, child, "--help"] for a in nested for child in a.choices]
    return cmds


@pytest.mark.parametrize("args", [["--help"], ["list"], ["list", "encoders"], ["list", "fusions"]],
                         ids=" ".join)
def test_help_and_list_import_no_torch(args: list[str]):
    out, heavy = _probe(*args)
    assert heavy == [], f"`vlkit {' '.join(args)}` imported {heavy}"
    assert out.strip()


def test_every_subcommand_help_imports_no_torch():
    commands = _commands()
    assert ["fit", "--help"] in commands and ["data", "demo", "--help"] in commands
    for args in commands:
        out, heavy = _probe(*args)
        assert heavy == [], f"`vlkit {' '.join(args)}` imported {heavy}"
        assert "usage: vlkit" in out


def _sections(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(" "):
            current = sections.setdefault(line.strip(), {})
        elif line.strip() and not line.startswith("details"):
            name, _, doc = line.strip().partition(" ")
            current[name] = doc.strip()
    return sections


def test_list_shows_plain_whole_sentences(capsys):
    assert main(["list"]) == 0
    sections = _sections(capsys.readouterr().out)
    assert {"encoders", "fusions", "llms", "datasets"} <= set(sections)
    assert {"clip", "dinov2", "florence2", "holistic"} <= set(sections["encoders"])
    assert {"mlp", "linear", "token_concat"} <= set(sections["fusions"])
    for kind, parts in sections.items():
        for name, doc in parts.items():
            assert doc, f"{kind} {name}: no description"
            assert not re.search(r"``|:(class|mod|func|meth|attr):|`", doc), f"{kind} {name}: reST in {doc!r}"
            assert doc[-1] in ".)!?" or doc.endswith(("output)", "output")), f"{kind} {name}: cut: {doc!r}"
    # the whole first sentence, not the first source line
    assert sections["fusions"]["token_concat"].endswith("may differ in token count and width.")
    assert sections["datasets"]["shards"] == ("Webdataset tar shards of LLaVA-style conversations (vlkit data "
                                               "demo / from-llava output).")


def test_list_one_part_shows_every_argument_with_type_default_and_doc(capsys):
    assert main(["list", "datasets", "shards"]) == 0
    out = capsys.readouterr().out
    import dataclasses

    from vlkit.data.shards import ShardDataset

    for f in dataclasses.fields(ShardDataset.Args):
        assert re.search(rf"^  {f.name}: ", out, re.M), f"argument {f.name} missing"
    assert "  urls: str = required\n" in out
    assert "  train_on: 'assistant' | 'last' | 'all' = 'assistant'\n" in out
    assert "  tasks: list[str] | None = None\n" in out
    # the field's attribute docstring, as plain text, untruncated (wrapped lines joined)
    text = " ".join(out.split())
    assert ("Shards: a brace pattern data/demo/train-{000000..000003}.tar or a glob data/demo/train-*.tar "
            "(several joined with ::); relative paths resolve against the working directory.") in text
    assert "``" not in out


def test_list_one_encoder_includes_the_common_key(capsys):
    assert main(["list", "encoders", "dinov2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("encoder dinov2  (built-in vlkit.encoders.dinov2:")
    assert re.search(r"^  key: str \| None = None$", out, re.M)


def test_list_unknown_part_is_a_one_line_error(capsys):
    assert main(["list", "fusions", "mpl"]) == 2
    err = capsys.readouterr().err
    assert "unknown fusion 'mpl'" in err and "Did you mean 'mlp'" in err


@pytest.mark.slow
def test_fit_fails_before_training_then_reruns_prints_plain_progress_and_predicts(tiny_recipe, demo_dir, tmp_path):
    """A fit that fails while building leaves the run folder reusable; without a terminal, progress is plain
    lines; the README's `vlkit predict` example runs on the demo's sample questions."""
    env = {**__import__("os").environ, "COLUMNS": "200"}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlkit.cli", "fit", str(tiny_recipe), "--run-dir", str(run)]
    bad = subprocess.run([*cmd, f"model.llm.tokenizer={tmp_path}/missing"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "folder not found" in bad.stderr, bad.stderr[-2000:]
    good = subprocess.run([*cmd, "trainer.progress_bar=true", "trainer.log_every_n_steps=2"], capture_output=True,
                          text=True, env=env)
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    lines = [line for line in good.stdout.splitlines() if line.startswith("stage ")]
    assert [line.split(" | ")[0] for line in lines] == ["stage 0 'align' step 2/3", "stage 0 'align' step 3/3",
                                                        "stage 1 'tune' step 2/4", "stage 1 'tune' step 4/4"]
    for line in lines:
        assert re.fullmatch(r"stage \d '\w+' step \d/\d \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| "
                            r"[\d,]+ tokens/s \| ETA \d\d:\d\d", line), line
    output = good.stdout + good.stderr
    for noise in ("Epoch 0/-2", "v_num", "Tip:", "GPU available", "LeafSpec", "\r"):
        assert noise not in output

    samples = demo_dir / "samples" / "questions.jsonl"
    questions = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(questions) == 5 and all((samples.parent / q["image"]).is_file() for q in questions)
    pred = subprocess.run([sys.executable, "-m", "vlkit.cli", "predict", str(run), "--input", str(samples)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)  # not the samples' folder
    assert pred.returncode == 0, pred.stderr[-2000:]
    answers = [json.loads(line) for line in pred.stdout.splitlines()]
    assert [a["question"] for a in answers] == [q["question"] for q in questions]
    assert all("expected" in a for a in answers)  # the input's other keys are kept
    from PIL import Image

    import vlkit

    model = vlkit.from_pretrained(run)
    images = [Image.open(samples.parent / q["image"]).convert("RGB") for q in questions]
    assert [a["answer"] for a in answers] == model.answer(images, [q["question"] for q in questions],
                                                          max_new_tokens=32)
