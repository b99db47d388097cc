"""Answer scoring against hand cases: VQAv2 normalisation (the official examples) and accuracy, POPE
parsing and metrics, multiple-choice letters, per-category breakdown."""

import pytest
from visprune.trainer.eval.scoring import (
    breakdown,
    category_of,
    mc_correct,
    mc_letter,
    mc_reference,
    normalize_answer,
    option_letters,
    pope_answer,
    pope_metrics,
    vqa_accuracy,
)


@pytest.mark.parametrize("raw, normalised", [
    # visualqa.org/evaluation.html: lower case, periods (not decimals) removed, number words to digits,
    # articles removed, apostrophes added to contractions, punctuation to space / removed
    ("Two", "2"), ("TEN dogs", "10 dogs"), ("none", "0"),
    ("the dog.", "dog"), ("A cat", "cat"), ("an apple", "apple"),
    ("3.5", "3.5"), ("It is 3.5 m.", "it is 3.5 m"), ("e.g. this", "eg this"),
    ("dont", "don't"), ("isnt it", "isn't it"), ("youre right", "you're right"),
    ("100,978", "100978"),  # a comma between digits: punctuation is removed, not spaced
    ("red,white", "red white"), ("red, white", "red white"), ("yes!", "yes"), ("(left)", "left"),
    ("black-and-white", "black and white"), ("x - ray", "x ray"), ("man's hat", "man's hat"),
    ("  Yes\n", "yes"), ("tab\there", "tab here"), ("", ""),
])
def test_vqa_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_accuracy_min_over_three_averaged_over_leave_one_out():
    # 3 of 10 humans said "2": leaving one of them out leaves 2 matches (2/3), else 3 (1): (3 * 2/3 + 7) / 10
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)  # 9 subsets with 1 match, 1 with none
    assert vqa_accuracy("2", ["2", "2"] + ["3"] * 8) == pytest.approx(0.6)  # (8 * 2/3 + 2 * 1/3) / 10
    assert vqa_accuracy("4", ["2"] * 10) == 0.0
    # one reference: exact match after normalisation on both sides
    assert vqa_accuracy("The Dog.", "dog") == 1.0 and vqa_accuracy("Dog", ["a dog"]) == 1.0
    assert vqa_accuracy("dogs", "dog") == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("yes.", "yes"), ("No", "no"), ("No, there is not.", "no"), ("Yes, there is a dog", "yes"),
    ("I see no dog, yes", "no"), ("There is a dog", "other"), ("nope", "other"), ("yesterday", "other"), ("", "other"),
])
def test_pope_answer_first_yes_or_no_word(text, parsed):
    assert pope_answer(text) == parsed


def test_pope_metrics_by_hand():
    preds = ["yes", "yes", "no", "no", "other", "yes"]
    refs = ["yes", "no", "no", "yes", "no", "yes"]
    got = pope_metrics(preds, refs)
    # tp 2, fp 1, tn 1, fn 1; "other" is wrong whatever the reference
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (2, 1, 1, 1)
    assert got["accuracy"] == pytest.approx(3 / 6)
    assert got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 / 3)
    assert got["yes_ratio"] == pytest.approx(3 / 6) and got["other_ratio"] == pytest.approx(1 / 6)
    assert pope_metrics(["no"], ["yes"])["f1"] == 0.0  # no positive predictions: 0, not a division error
    with pytest.raises(ValueError, match="yes or no"):
        pope_metrics(["yes"], ["maybe"])


OPTIONS = ["cat", "dog", "red square", "blue"]


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("b", "B"), ("B) dog", "B"), ("C: red square", "C"), ("D. blue", "D"),
    ("The answer is B", "B"), ("answer: (C)", "C"), ("Option D", "D"), ("I think it is C", "C"),
    ("dog", "B"), ("Red Square.", "C"), ("It is a red square.", "C"),
    ("A cat", "A"),  # option A's text after the letter
    ("A dog", "B"),  # "A" is the article here: the option text decides
    ("A and B", None), ("none of them", None), ("E", None),  # two letters / nothing / not an option
])
def test_mc_letter(text, letter):
    assert mc_letter(text, OPTIONS) == letter


def test_mc_letters_without_options_and_mapping_options():
    assert mc_letter("(C)") == "C" and mc_letter("The answer is E") == "E" and mc_letter("no letter here") is None
    mapping = {"a": "one", "B": "two"}
    assert option_letters(mapping) == {"A": "one", "B": "two"}
    assert mc_letter("two", mapping) == "B" and mc_correct("(A)", "A", mapping)
    assert mc_reference("dog", OPTIONS) == "B" and mc_reference("C", OPTIONS) == "C"
    with pytest.raises(ValueError, match="neither a letter nor"):
        mc_reference("a fish", OPTIONS)
    with pytest.raises(ValueError, match="single letters"):
        option_letters({"AB": "x"})


def test_categories_and_breakdown():
    assert category_of({"category": "color", "qtype": "x"}) == "color"
    assert category_of({"qtype": "count"}) == "count" and category_of({}) == "all"
    got = breakdown([1.0, 0.0, 1.0, 0.5], ["b", "a", "b", "a"])
    assert list(got) == ["a", "b"]
    assert got["a"] == {"score": 0.25, "samples": 2} and got["b"] == {"score": 1.0, "samples": 2}
