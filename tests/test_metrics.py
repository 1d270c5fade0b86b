"""Answer metrics, each checked on examples computed by hand from its benchmark's definition."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import vlkit
from vlkit.errors import RecipeError
from vlkit.eval.metrics import (
    METRICS,
    build_metrics,
    choose_by_likelihood,
    levenshtein,
    normalize_answer,
    vqa_normalize,
)


def compute(name: str, pairs: list[tuple[str, list[str] | str]]) -> float:
    (metric,) = build_metrics([name])
    for pred, refs in pairs:
        metric.update(pred, refs)
    return metric.compute()


def test_exact_match_normalizes_case_space_and_surrounding_punctuation():
    import vlkit.module

    assert vlkit.module.normalize_answer is normalize_answer  # re-exported where it used to live
    assert normalize_answer("  Red  Square. ") == "red square"
    assert compute("exact_match", [("Red.", "red"), ("blue", ["green", "Blue"]), ("two", "2")]) == pytest.approx(2 / 3)
    assert math.isnan(compute("exact_match", []))


def test_vqa_answer_normalisation_follows_the_official_script():
    assert vqa_normalize("Two dogs.") == "2 dogs"  # number words -> digits, period stripped
    assert vqa_normalize("The  cat") == "cat"  # articles dropped, whitespace collapsed
    assert vqa_normalize("dont know") == "don't know"  # contractions restored
    assert vqa_normalize("1,000") == "1000"  # a comma between digits removes every punctuation mark
    assert vqa_normalize("cat,dog") == "cat dog"  # otherwise punctuation becomes a space
    assert vqa_normalize("yes!") == "yes"
    assert vqa_normalize("3.5") == "3.5"  # a decimal point stays


def test_vqa_accuracy_averages_min_matches_over_3_over_the_ten_leave_one_out_subsets():
    humans = ["2"] * 3 + ["3"] * 7
    # "2": leaving out one of the three "2"s leaves 2 matches (2/3); leaving out a "3" leaves 3 (1)
    assert compute("vqa_accuracy", [("2", humans)]) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert compute("vqa_accuracy", [("two", humans)]) == pytest.approx(0.9)  # normalized before matching
    assert compute("vqa_accuracy", [("3", humans)]) == pytest.approx(1.0)
    one = ["red"] + ["blue"] * 9  # one human agrees: 0 when that one is left out, 1/3 otherwise
    assert compute("vqa_accuracy", [("Red", one)]) == pytest.approx(9 / 10 * 1 / 3)
    assert compute("vqa_accuracy", [("green", one), ("2", humans)]) == pytest.approx(0.45)


def test_anls_uses_normalized_levenshtein_with_threshold_half():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert compute("anls", [("hallo", "hello")]) == pytest.approx(1 - 1 / 5)
    assert compute("anls", [(" Hello  World ", "hello world")]) == 1.0
    assert compute("anls", [("ab", "abcd")]) == 0.0  # NL = 0.5 is not below the threshold
    assert compute("anls", [("abcd", ["xyz", "abce"])]) == pytest.approx(0.75)  # best reference counts
    assert compute("anls", [("hallo", "hello"), ("abc", "xyz")]) == pytest.approx(0.4)


def test_multiple_choice_picks_the_most_likely_option():
    choices = ["a circle", "a square", "a triangle"]
    assert choose_by_likelihood(choices, [-4.0, -1.5, -2.0]) == "a square"
    with pytest.raises(ValueError, match="3 choices but 2 scores"):
        choose_by_likelihood(choices, [-1.0, -2.0])
    preds = [choose_by_likelihood(choices, s) for s in ([-4.0, -1.5, -2.0], [-1.0, -3.0, -2.0])]
    assert compute("multiple_choice", list(zip(preds, ["a square", "a square"]))) == 0.5


def test_cider_matches_the_cider_d_definition_on_two_images():
    # Two images, one reference each. idf = log(N / df) = log 2 for every n-gram present in one image.
    # Image 1, candidate equal to its reference "red square": cosine 1 for 1- and 2-grams, no 3-/4-grams
    # -> mean over n = (1 + 1 + 0 + 0) / 4, times 10 = 5.0.
    assert compute("cider", [("red square", "red square"), ("blue circle", "blue circle")]) == pytest.approx(5.0)
    # Candidate "red moon" for "red square": unigram vectors (log2, log2) vs (log2, log2) sharing "red" only:
    # clipped dot product log2^2 / (sqrt2 log2)^2 = 1/2; no shared bigram -> (0.5 / 4) * 10 = 1.25.
    score = compute("cider", [("Red moon.", "red square"), ("blue circle", "blue circle")])
    assert score == pytest.approx((1.25 + 5.0) / 2)


def test_recipe_selects_metrics_and_rejects_unknown_ones(tiny_recipe: Path):
    recipe = vlkit.load_recipe(tiny_recipe, ["eval.metrics=[exact_match,vqa_accuracy,anls]"])
    assert [m.name for m in build_metrics(recipe.eval.metrics)] == ["exact_match", "vqa_accuracy", "anls"]
    assert vlkit.load_recipe(tiny_recipe).eval.metrics == ["exact_match"]
    with pytest.raises(RecipeError, match=r"eval\.metrics\[1\]: unknown metric 'vqa_acc'.*Did you mean "
                                          r"'vqa_accuracy'"):
        vlkit.load_recipe(tiny_recipe, ["eval.metrics=[exact_match,vqa_acc]"])
    with pytest.raises(RecipeError, match="listed twice"):
        vlkit.load_recipe(tiny_recipe, ["eval.metrics=[anls,anls]"])
    assert set(METRICS) == {"exact_match", "vqa_accuracy", "anls", "multiple_choice", "cider"}


def test_metric_state_merges_across_processes():
    a, b = build_metrics(["anls"]) + build_metrics(["anls"])
    a.update("hallo", "hello")
    b.update("abc", "xyz")
    a.merge(b.items)
    assert len(a) == 2 and a.compute() == pytest.approx(0.4)


# ---------------------------------------------------------------------- in-loop validation (lm objective)


def _spy_validation(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Record what the lm objective's last validation generated: predictions, references and types, and
    the ``max_new_tokens`` it asked for."""
    from vlkit.model import VLM
    from vlkit.objectives.lm import LanguageModeling

    seen: dict[str, list] = {"preds": [], "refs": [], "types": [], "max_new_tokens": []}
    real_generate, real_reset, real_step = VLM.generate, LanguageModeling.reset_validation, \
        LanguageModeling.validation_step

    def generate(self, *args, **kwargs):
        out = real_generate(self, *args, **kwargs)
        seen["preds"].extend(out)
        seen["max_new_tokens"].append(kwargs["max_new_tokens"])
        return out

    def reset(self):
        for v in seen.values():
            v.clear()
        real_reset(self)

    def step(self, model, batch):
        seen["refs"].extend(batch["answer"])
        seen["types"].extend(batch["type"])
        real_step(self, model, batch)

    monkeypatch.setattr(VLM, "generate", generate)
    monkeypatch.setattr(LanguageModeling, "reset_validation", reset)
    monkeypatch.setattr(LanguageModeling, "validation_step", step)
    return seen


def _hand_anls(pred: str, ref: str) -> float:
    p, r = " ".join(pred.lower().split()), " ".join(ref.lower().split())
    nl = levenshtein(p, r) / max(len(p), len(r), 1)
    return 1 - nl if nl < 0.5 else 0.0


def test_fit_reports_each_recipe_metric_overall_and_per_type_as_computed_by_hand(
        tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from vlkit.registry import DATASETS
    from vlkit.training.fit import majority_baseline

    seen = _spy_validation(monkeypatch)
    recipe = vlkit.load_recipe(tiny_recipe, [
        "stages=[{name: s, trainable: [fusion, llm], lr: 3.0e-3, max_steps: 6}]", "eval.metrics=[exact_match,anls]",
        "eval.max_new_tokens=4"])
    val = vlkit.fit(recipe, tmp_path / "run")["val"]
    baseline = majority_baseline(DATASETS.build(recipe.data.train, "data.train"), recipe.eval.baseline_samples)
    rows = list(zip(seen["preds"], seen["refs"], seen["types"]))
    assert len(rows) == val["val/count"] == 32 and set(seen["max_new_tokens"]) == {4}

    def em(p, r):
        return float(normalize_answer(p) == normalize_answer(r))

    types = sorted({t for _, _, t in rows})
    assert len(types) > 1
    for suffix, group in [("", rows), *((f"/{t}", [r for r in rows if r[2] == t]) for t in types)]:
        base = [(baseline.get(t, baseline[None]), r) for _, r, t in group]
        assert val[f"val/count{suffix}"] == len(group)
        assert val[f"val/accuracy{suffix}"] == pytest.approx(sum(em(p, r) for p, r, _ in group) / len(group))
        assert val[f"val/anls{suffix}"] == pytest.approx(sum(_hand_anls(p, r) for p, r, _ in group) / len(group))
        assert val[f"val/baseline{suffix}"] == pytest.approx(sum(em(p, r) for p, r in base) / len(group))
        assert val[f"val/baseline_anls{suffix}"] == pytest.approx(sum(_hand_anls(p, r) for p, r in base) / len(group))
    assert val["val/baseline_anls"] >= val["val/baseline"] > 0  # ANLS also credits near misses


def test_validation_states_of_ranks_merge_into_the_single_process_metrics():
    """Answers gathered from two ranks give the metrics of all answers in one process, corpus-level CIDEr
    included (its document frequencies span both ranks' references)."""
    from vlkit.config import EvalConfig
    from vlkit.objectives.lm import LanguageModeling

    answers = [("red square", "red square", "caption"), ("blue circle", "blue circle", "caption"),
               ("two", "2", "count"), ("green", "green", "color"), ("a red moon", "red square", "caption")]
    lm = LanguageModeling(None, model=None, eval_cfg=EvalConfig(max_new_tokens=4, metrics=["exact_match", "cider"]),
                          baseline={None: "red square", "count": "2"})
    one = lm.validation_metrics([(answers, [6.0, 3])])
    two = lm.validation_metrics([(answers[:2], [2.0, 1]), (answers[2:], [4.0, 2])])
    assert one == two and one["val/loss"] == 2.0 and one["val/count/caption"] == 3
    assert one["val/accuracy"] == pytest.approx(3 / 5) and one["val/baseline/count"] == 1.0
    caption = build_metrics(["cider"])[0]
    caption.merge([(p, [r]) for p, r, t in answers if t == "caption"])
    assert one["val/cider/caption"] == pytest.approx(caption.compute())
    alone = build_metrics(["cider"])[0]
    alone.merge([(p, [r]) for p, r, _ in answers[:2]])
    assert one["val/cider/caption"] != pytest.approx(alone.compute())  # not an average of per-rank scores


def test_multiple_choice_is_refused_for_in_loop_validation_and_max_new_tokens_checked(tiny_recipe: Path):
    with pytest.raises(RecipeError, match=r"eval\.metrics\[1\]: multiple_choice ranks .* `vlkit eval`"):
        vlkit.load_recipe(tiny_recipe, ["eval.metrics=[exact_match,multiple_choice]"])
    with pytest.raises(RecipeError, match=r"eval\.max_new_tokens: must be at least 1"):
        vlkit.load_recipe(tiny_recipe, ["eval.max_new_tokens=0"])


# ------------------------------------------------------------------------ max_new_tokens from the answers


def test_default_max_new_tokens_fits_the_longest_validation_answer_and_a_recipe_value_wins(
        tiny_recipe: Path, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The demo's box answers ("[0.05, 0.31, 0.30, 0.58]") were cut by the old default of 8 tokens: with
    eval.max_new_tokens left out, generation gets every trained token of the longest one (answer + end of
    turn, as the processor labels it)."""
    from vlkit.constants import IGNORE_INDEX
    from vlkit.data.conversation import messages_from_llava
    from vlkit.data.reading import decode_image, read_meta, read_shard

    seen = _spy_validation(monkeypatch)
    box_val = f"data.val={{name: shards, urls: '{demo_dir}/box_val-000000.tar', batch_size: 8, num_workers: 0}}"
    stage = "stages=[{name: s, trainable: [fusion], lr: 1.0e-3, max_steps: 1}]"
    recipe = vlkit.load_recipe(tiny_recipe, [box_val, stage, "eval.max_new_tokens=null", "eval.max_samples=8",
                                             "eval.baseline_samples=16"])
    assert recipe.eval.max_new_tokens is None
    vlkit.fit(recipe, tmp_path / "auto")
    budget = set(seen["max_new_tokens"])

    model = vlkit.build_model(recipe)
    proc = model.processor()
    trained = []
    for sample in read_shard(f"{demo_dir}/box_val-000000.tar"):
        feats = proc.train_features(messages_from_llava(read_meta(sample)["conversations"]), decode_image(sample))
        trained.append(sum(label != IGNORE_INDEX for label in feats["labels"]))
    print(f"max_new_tokens {budget}; trained tokens of the box answers: {min(trained)}..{max(trained)}")
    assert budget == {max(trained)} and max(trained) > 8

    vlkit.fit(vlkit.load_recipe(tiny_recipe, [box_val, stage, "eval.max_new_tokens=5", "eval.max_samples=8",
                                              "eval.baseline_samples=16"]), tmp_path / "explicit")
    assert set(seen["max_new_tokens"]) == {5}
