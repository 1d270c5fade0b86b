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
