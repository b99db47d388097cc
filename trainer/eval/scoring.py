"""Answer scoring for generated answers, the way VQA benchmarks score them (no model, no I/O):

- `normalize_answer`: the VQAv2 evaluation's answer normalisation (`processPunctuation` then
  `processDigitArticle` of the official `vqaEval.py`, as lmms-eval's `EvalAIAnswerProcessor` without
  its extra word tokenisation): punctuation removed or replaced by a space, periods dropped except in
  decimals, lower case, number words to digits, articles dropped, missing contraction apostrophes added;
- `vqa_accuracy`: VQAv2 accuracy, min(1, #humans that gave the answer / 3) averaged over the
  10-choose-9 subsets of the reference answers; a single reference is exact match after normalisation;
- `pope_answer` / `pope_metrics`: the first yes/no word of an answer ("other" when there is none) and
  accuracy, precision, recall, F1 and yes-ratio with "yes" as the positive class;
- `mc_letter` / `mc_correct`: the option letter an answer picks ("B", "(B)", "B.", "The answer is B",
  or the text of exactly one option);
- `answers_agree`: whether two models' answers are equal after `normalize_answer`;
- `category_of` / `breakdown`: per-category means (a record's `category`, else `qtype`, else "all").
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# `visprune eval --metric`: teacher_forced is `teacher_forced.evaluate`, the others score generated answers
METRICS = ("teacher_forced", "vqa", "pope", "mc")
GENERATION_METRICS = ("vqa", "pope", "mc")
METRIC_NAMES = {"teacher_forced": "teacher-forced exact match", "vqa": "VQA accuracy", "pope": "POPE accuracy",
                "mc": "multiple-choice accuracy"}

# ---- VQAv2 normalisation (vqaEval.py, github.com/GT-Vision-Lab/VQA, BSD) ------------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# the official pattern, typo included: "(?!<=\d)" is a look-ahead that always holds, so this strips every
# period not followed by a digit ("3.5" keeps its period, "dog." and "e.g." lose theirs)
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`: each punctuation mark is deleted when it touches a space (or
    the text has a comma between digits, e.g. "100,978"), else replaced by a space; then periods that
    are not a decimal point are deleted."""
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # (sic) the official code passes re.UNICODE as `count`


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower case, number words to digits, articles dropped,
    missing contraction apostrophes added, words joined by single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """An answer as the VQAv2 evaluation compares it (newlines and tabs to spaces, stripped, then
    `process_punctuation` and `process_digit_article`)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(pred: str, answers: str | Sequence[str]) -> float:
    """VQAv2 accuracy of `pred` against the reference `answers` (normally the 10 human answers).

    With several references, each reference is left out in turn and the prediction scores
    min(1, matches among the other references / 3); the score is the mean over those subsets (the
    official code). A single reference (a string or a one-item list) is exact match after normalisation.
    Both sides are normalised with `normalize_answer` (the official code normalises only when the
    references disagree because its references are stored normalised; local files need not be).
    """
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    got = normalize_answer(pred)
    refs = [normalize_answer(ref) for ref in refs]
    if len(refs) == 1:
        return float(got == refs[0])
    scores = []
    for left_out in range(len(refs)):
        matches = sum(ref == got for idx, ref in enumerate(refs) if idx != left_out)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# ---- POPE -----------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")


def pope_answer(text: str) -> str:
    """"yes" or "no": the first of those words in `text` (case-insensitive, whole words); "other" when
    neither occurs ("Yes, there is a dog" -> yes, "No." -> no, "There is a dog" -> other)."""
    for word in _WORD.findall(text.lower()):
        if word in ("yes", "no"):
            return word
    return "other"


def pope_metrics(preds: Iterable[str], refs: Iterable[str]) -> dict[str, float]:
    """POPE's numbers over parsed answers ("yes" / "no" / "other"; references must be yes or no):
    accuracy, precision, recall and F1 with "yes" as the positive class, the yes-ratio of the
    predictions, and the fraction of predictions that are neither (`other_ratio`, always wrong)."""
    preds, refs = list(preds), list(refs)
    if len(preds) != len(refs):
        raise ValueError(f"pope_metrics: {len(preds)} predictions but {len(refs)} references")
    bad = sorted({ref for ref in refs if ref not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE references must be yes or no, got {bad}")
    n = len(preds)
    tp = sum(p == "yes" and r == "yes" for p, r in zip(preds, refs))
    fp = sum(p == "yes" and r == "no" for p, r in zip(preds, refs))
    tn = sum(p == "no" and r == "no" for p, r in zip(preds, refs))
    fn = sum(p != "yes" and r == "yes" for p, r in zip(preds, refs))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p == "yes" for p in preds) / n if n else 0.0,
            "other_ratio": sum(p == "other" for p in preds) / n if n else 0.0,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "samples": n}


# ---- multiple choice ------------------------------------------------------------------------------------

def option_letters(options: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """{letter: option text}: a list becomes A, B, C, ...; a mapping keeps its (upper-cased) letters."""
    if isinstance(options, Mapping):
        letters = {str(key).strip().upper(): str(value) for key, value in options.items()}
        bad = [key for key in letters if len(key) != 1 or key not in string.ascii_uppercase]
        if bad:
            raise ValueError(f"option keys must be single letters A-Z, got {bad}")
        return letters
    if len(options) > 26:
        raise ValueError(f"at most 26 options, got {len(options)}")
    return {string.ascii_uppercase[idx]: str(text) for idx, text in enumerate(options)}


def _simple(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def mc_letter(text: str, options: Sequence[str] | Mapping[str, str] | None = None) -> str | None:
    """The option letter `text` picks, or None. Tried in order:

    1. the whole answer is one option's text (case and punctuation ignored);
    2. the answer is a letter, alone or as "(B)", "B.", "B)", "B:", or starts with one of those
       ("B. a red square", "(B) red");
    3. "answer is B", "answer: (B)", "option B", "choice B" (first such phrase);
    4. exactly one option's text occurs in the answer (as whole words);
    5. exactly one distinct standalone capital letter among the valid letters occurs in the answer
       (the pronoun in "I think" does not count).

    The valid letters are those of `options` (A-Z when None).
    """
    letters = option_letters(options) if options is not None else {}
    valid = set(letters) if letters else set(string.ascii_uppercase)
    stripped = text.strip()
    simple = _simple(stripped)
    texts = {letter: _simple(option) for letter, option in letters.items()}
    exact = [letter for letter, option in texts.items() if option and option == simple]
    if len(exact) == 1:
        return exact[0]
    alone = re.match(r"^\(?([A-Za-z])\)?[.):]?$", stripped)
    if alone and alone.group(1).upper() in valid:
        return alone.group(1).upper()
    start = re.match(r"^\(?([A-Z])(?:\)|[.):,]|\s)", stripped)
    if start and start.group(1) in valid:
        letter = start.group(1)
        rest = _simple(stripped[start.end():])
        # "A cat" / "I think" start with a word, not with option A / I (unless the rest is that option's text)
        word = letter in ("A", "I") and stripped[1:2] == " " and rest != texts.get(letter)
        if not word:
            return letter
    phrase = re.search(r"\b(?:answer|option|choice)\b\s*(?:is|:)?\s*:?\s*\(?([A-Z])\b\)?", stripped, re.IGNORECASE)
    if phrase and phrase.group(1).upper() in valid and phrase.group(1).isupper():
        return phrase.group(1)
    padded = f" {simple} "
    inside = [letter for letter, option in texts.items() if option and f" {option} " in padded]
    if len(inside) == 1:
        return inside[0]
    capitals = set()
    for match in re.finditer(r"\b([A-Z])\b", stripped):
        if match.group(1) == "I" and re.match(r" [a-z]", stripped[match.end():]):
            continue  # the pronoun ("I think ...")
        if match.group(1) in valid:
            capitals.add(match.group(1))
    if len(capitals) == 1:
        return capitals.pop()
    return None


def mc_correct(pred: str, answer: str, options: Sequence[str] | Mapping[str, str] | None = None) -> bool:
    """Whether `pred` picks the letter `answer` (a letter, or an option's text when `options` are given)."""
    return mc_letter(pred, options) == mc_reference(answer, options)


def mc_reference(answer: str, options: Sequence[str] | Mapping[str, str] | None = None) -> str:
    """The reference letter of a multiple-choice record: `answer` parsed as `mc_letter` parses answers."""
    letter = mc_letter(answer, options)
    if letter is None:
        raise ValueError(f"multiple-choice reference {answer!r} is neither a letter nor one option's text")
    return letter


def answers_agree(a: Sequence[str], b: Sequence[str]) -> list[float]:
    """1.0 where the two answers of a pair are equal after `normalize_answer`, else 0.0 (one per pair)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"answers_agree needs two equally long non-empty answer lists, got {len(a)} and {len(b)}")
    return [float(normalize_answer(x) == normalize_answer(y)) for x, y in zip(a, b)]


# ---- per-category breakdown -----------------------------------------------------------------------------

def category_of(record: Mapping[str, Any]) -> str:
    """A record's category: its `category`, else its `qtype` (the see-task), else "all"."""
    for key in ("category", "qtype"):
        value = record.get(key)
        if value not in (None, ""):
            return str(value)
    return "all"


def breakdown(scores: Iterable[float], categories: Iterable[str]) -> dict[str, dict[str, float]]:
    """{category: {"score": mean score, "samples": n}}, categories sorted."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for score, category in zip(scores, categories):
        sums[category][0] += score
        sums[category][1] += 1
    return {category: {"score": total / count, "samples": int(count)}
            for category, (total, count) in sorted(sums.items())}


__all__ = ["GENERATION_METRICS", "METRICS", "METRIC_NAMES", "answers_agree", "breakdown", "category_of",
           "mc_correct", "mc_letter", "mc_reference", "normalize_answer", "option_letters", "pope_answer",
           "pope_metrics", "process_digit_article", "process_punctuation", "vqa_accuracy"]
