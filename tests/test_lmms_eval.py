"""The lmms-eval adapter, verified offline through lmms-eval's own evaluator on local tasks built from the
demo validation shard: generation (exact match equals ``vlkit validate``), likelihood ranking (multiple
choice), ``until`` stop strings, and ``vlkit eval``'s files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")
datasets = pytest.importorskip("datasets")

import vlkit  # noqa: E402
from vlkit.cli import main  # noqa: E402
from vlkit.data.reading import decode_image, read_meta, read_shard  # noqa: E402

N_SAMPLES = 32

UTILS = '''\
from vlkit.eval.metrics import normalize_answer


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
'''

VQA_TASK = """\
task: vlkit_demo_vqa
dataset_path: {data}
dataset_kwargs: {{load_from_disk: true}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 3}}
process_results: !function utils.process_results
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""

MC_TASK = """\
task: vlkit_demo_mc
dataset_path: {data}
dataset_kwargs: {{load_from_disk: true}}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
"""

TRAIN_STAGE = "  - {name: train, trainable: [encoders, fusion, llm], lr: 3.0e-3, max_steps: 150, warmup: 10}\n"


def demo_docs(demo_dir: Path, n: int) -> list[dict]:
    docs = []
    for sample in read_shard(str(demo_dir / "val-000000.tar")):
        meta = read_meta(sample)
        conv = meta["conversations"]
        docs.append({"image": decode_image(sample), "question": conv[0]["value"], "answer": conv[1]["value"],
                     "type": meta["type"]})
        if len(docs) == n:
            break
    return docs


@pytest.fixture(scope="module")
def tasks_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two local lmms-eval tasks over the first validation samples: open answers, and 3-way multiple choice
    (the gold answer against answers of two other question types)."""
    folder = tmp_path_factory.mktemp("lmms_tasks")
    docs = demo_docs(demo_dir, N_SAMPLES)
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "type": datasets.Value("string")})
    vqa = datasets.Dataset.from_list(docs, features=features)
    datasets.DatasetDict({"test": vqa}).save_to_disk(str(folder / "vqa_data"))
    by_type: dict[str, str] = {}
    for d in docs:
        by_type.setdefault(d["type"], d["answer"])
    mc = []
    for i, d in enumerate(docs):
        others = [a for t, a in sorted(by_type.items()) if t != d["type"]][:2]
        choices = [*others]
        gold = i % 3
        choices.insert(gold, d["answer"])
        mc.append({**d, "choices": choices, "gold": gold})
    mc_features = datasets.Features({**features, "choices": datasets.Sequence(datasets.Value("string")),
                                     "gold": datasets.Value("int32")})
    datasets.DatasetDict({"test": datasets.Dataset.from_list(mc, features=mc_features)}).save_to_disk(
        str(folder / "mc_data"))
    (folder / "utils.py").write_text(UTILS)
    (folder / "vlkit_demo_vqa.yaml").write_text(VQA_TASK.format(data=folder / "vqa_data"))
    (folder / "vlkit_demo_mc.yaml").write_text(MC_TASK.format(data=folder / "mc_data"))
    return folder


@pytest.fixture(scope="module")
def trained_run(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import TINY_RECIPE

    text = TINY_RECIPE.format(demo=demo_dir)
    start, end = text.index("stages:\n"), text.index("eval:")
    text = text[:start] + "stages:\n" + TRAIN_STAGE + text[end:]
    folder = tmp_path_factory.mktemp("lmms_run")
    (folder / "recipe.yaml").write_text(text)
    run = folder / "run"
    vlkit.fit(vlkit.load_recipe(folder / "recipe.yaml"), run)
    return run


@pytest.mark.slow
def test_lmms_eval_exact_match_equals_vlkit_validate(trained_run: Path, tasks_dir: Path, tmp_path: Path):
    assert main(["validate", str(trained_run), "--out", str(tmp_path / "val.json")]) == 0
    validate = json.loads((tmp_path / "val.json").read_text())
    assert validate["val/count"] == N_SAMPLES

    out = tmp_path / "eval"
    assert main(["eval", str(trained_run), "--tasks", "vlkit_demo_vqa,vlkit_demo_mc", "--include-path",
                 str(tasks_dir), "--out", str(out), "--limit", str(N_SAMPLES)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    em = results["vlkit_demo_vqa"]["exact_match,none"]
    print(f"exact match: lmms-eval {em:.4f}, vlkit validate {validate['val/accuracy']:.4f}; "
          f"multiple choice acc {results['vlkit_demo_mc']['acc,none']:.4f}")
    assert em == pytest.approx(validate["val/accuracy"])
    assert em > 0  # a trained model: the comparison is not between two zeros
    table = (out / "results.md").read_text()
    assert "vlkit_demo_vqa" in table and "exact_match" in table


@pytest.mark.slow
def test_loglikelihood_is_mean_nll_and_ranks_the_gold_choice_best(trained_run: Path, tasks_dir: Path):
    from lmms_eval import evaluator
    from lmms_eval.api.instance import Instance
    from lmms_eval.tasks import TaskManager

    from vlkit.eval.lmms import VLKitLMM

    lm = VLKitLMM(pretrained=str(trained_run), batch_size=4)
    results = evaluator.simple_evaluate(model=lm, tasks=["vlkit_demo_mc"], limit=N_SAMPLES,
                                        task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=False)
    acc = results["results"]["vlkit_demo_mc"]["acc,none"]
    lm = VLKitLMM(pretrained=str(trained_run), batch_size=4)  # the evaluator frees the model it ran

    # reference: the LLM's own loss (mean NLL of the continuation tokens) on prompt + " " + choice
    model = lm.model
    proc = model.processor(max_length=4096)
    data = datasets.load_from_disk(str(tasks_dir / "mc_data"))["test"]
    correct = 0
    lm.task_dict = {"t": {"test": data}}
    for doc_id, doc in enumerate(data):
        nlls = []
        requests = []
        for choice in doc["choices"]:
            prompt = proc.prompt_features([vlkit.data.conversation.Message("user", doc["question"])],
                                          doc["image"].convert("RGB"))
            cont = model.llm.tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt["input_ids"] + cont])
            labels = torch.full_like(ids, -100)
            labels[0, -len(cont):] = torch.tensor(cont)
            with torch.no_grad():
                nlls.append(model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  pixel_values=prompt["pixel_values"][None], labels=labels).loss.item())
            requests.append(Instance("loglikelihood", (doc["question"], " " + choice, lambda d: [d["image"]],
                                                       doc_id, "t", "test"),
                                     idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1}))
        got = [r.text[0] for r in lm.loglikelihood(requests)]  # wrapped for lmms-eval (see the adapter)
        assert [ll for ll, _ in lm.score(requests)] == got
        assert got == pytest.approx(nlls, abs=1e-4)  # batched adapter == one-by-one reference
        correct += int(min(range(len(nlls)), key=nlls.__getitem__) == doc["gold"])
    print(f"multiple choice: lmms-eval acc {acc:.3f}, reference {correct / len(data):.3f}")
    assert acc == pytest.approx(correct / len(data))
    assert acc >= 0.8  # gold (an answer of the question's own type) beats answers to other questions


@pytest.mark.slow
def test_generate_until_honours_stop_strings_and_max_new_tokens(trained_run: Path, tasks_dir: Path):
    from lmms_eval.api.instance import Instance

    from vlkit.eval.lmms import VLKitLMM

    lm = VLKitLMM(pretrained=str(trained_run), batch_size=2)
    data = datasets.load_from_disk(str(tasks_dir / "vqa_data"))["test"]
    lm.task_dict = {"t": {"test": data}}

    def ask(gen_kwargs: dict) -> list[str]:
        reqs = [Instance("generate_until", (data[i]["question"], dict(gen_kwargs), lambda d: [d["image"]], i, "t",
                                            "test"), idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
                for i in range(3)]
        return lm.generate_until(reqs)

    long = ask({"max_new_tokens": 6})
    expected = [model_answer for model_answer in lm.model.answer([data[i]["image"] for i in range(3)],
                                                                 [data[i]["question"] for i in range(3)],
                                                                 max_new_tokens=6)]
    assert long == expected  # same prompts, same greedy decoding as the model's own answer()
    short = ask({"max_new_tokens": 1})
    assert all(len(lm.tokenizer(s, add_special_tokens=False)["input_ids"]) <= 1 for s in short)
    stop = next(t[1:2] for t in long if len(t) > 1)
    cut = ask({"max_new_tokens": 6, "until": [stop]})
    assert cut == [t.split(stop, 1)[0] for t in long] and cut != long


@pytest.mark.slow
def test_unknown_task_and_bad_model_folder_are_clear_errors(tmp_path: Path, capsys):
    assert main(["eval", str(tmp_path), "--tasks", "vlkit_no_such_task"]) == 2
    assert "unknown lmms-eval task(s): 'vlkit_no_such_task'" in capsys.readouterr().err
    from vlkit.eval.lmms import load_model

    with pytest.raises(vlkit.errors.CheckpointError, match="neither a vlkit run folder"):
        load_model(tmp_path)
