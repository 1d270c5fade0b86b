"""Answer metrics for validation and benchmarks, chosen by name in the recipe (``eval.metrics``).

Every metric collects ``(prediction, references)`` pairs with :meth:`Metric.update` and turns them into one
number with :meth:`Metric.compute`; its state is that plain list, so per-type tables and distributed
gathering just split or concatenate it (:meth:`Metric.merge`)::

    metrics = build_metrics(["exact_match", "vqa_accuracy"])
    for m in metrics:
        m.update("Two", ["2", "two", "2", "3", ...])
    scores = [(m.name, m.compute()) for m in metrics]

``exact_match``      normalized string equality with any reference (:func:`normalize_answer`)
``vqa_accuracy``     VQAv2 soft accuracy: min(#matching humans / 3, 1), averaged over the 10 leave-one-out
                     subsets of the 10 human answers, after the official answer normalisation
``anls``             DocVQA's Average Normalized Levenshtein Similarity (threshold 0.5)
``multiple_choice``  accuracy of the choice the model ranks most likely (:func:`choose_by_likelihood`)
``cider``            CIDEr-D over the collected captions (pycocoevalcap; ``pip install vlkit[eval]``)
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from vlkit.errors import RecipeError


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, drop surrounding punctuation (exact match after this)."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?,;:\"'")


class Metric:
    """A metric over ``(prediction, references)`` pairs; subclasses define :meth:`score` (per sample) or
    override :meth:`compute` (corpus-level)."""

    name: str = ""
    scores_generated: bool = True
    """Whether it scores generated answers (in-loop validation); False: it needs choices ranked by likelihood."""

    def __init__(self) -> None:
        self.items: list[tuple[str, list[str]]] = []

    def update(self, pred: str, refs: str | Sequence[str]) -> None:
        self.items.append((pred, [refs] if isinstance(refs, str) else list(refs)))

    def merge(self, items: Iterable[tuple[str, Sequence[str]]]) -> None:
        """Add the pairs another process (or another metric of the same kind) collected."""
        self.items.extend((p, list(r)) for p, r in items)

    def score(self, pred: str, refs: list[str]) -> float:
        raise NotImplementedError

    def compute(self) -> float:
        """The metric over every pair collected (nan when there is none)."""
        if not self.items:
            return float("nan")
        return sum(self.score(p, r) for p, r in self.items) / len(self.items)

    def __len__(self) -> int:
        return len(self.items)


class ExactMatch(Metric):
    """1 when the normalized prediction equals any normalized reference."""

    name = "exact_match"

    def score(self, pred: str, refs: list[str]) -> float:
        p = normalize_answer(pred)
        return float(any(p == normalize_answer(r) for r in refs))


# ------------------------------------------------------------------------------------------- VQAv2

# The answer normalisation of the official VQA evaluation (GT-Vision-Lab/VQA vqaEval.py, also EvalAI's).
_CONTRACTION_TABLE = """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
    itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
    mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
    oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
    shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
    shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
    somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
    someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
    somethingd=something'd somethingd've=something'd've something'dve=something'd've
    somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
    therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
    theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
    werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
    wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
    whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
    wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
    you'dve=you'd've youll=you'll youre=you're youve=you've
"""
_CONTRACTIONS = dict(pair.split("=") for pair in _CONTRACTION_TABLE.split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(text: str) -> str:
    """The official VQA answer processing: punctuation, number words to digits, articles, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


class VQAAccuracy(Metric):
    """VQAv2 accuracy: for each of the N human answers left out in turn, min(#other humans agreeing / 3, 1);
    the mean over the N subsets (N = 10 in VQAv2). Answers are normalized with :func:`vqa_normalize` (always,
    as EvalAI and lmms-eval do; the original script only when the humans disagree). One reference: exact
    match after normalisation."""

    name = "vqa_accuracy"

    def score(self, pred: str, refs: list[str]) -> float:
        p = vqa_normalize(pred)
        gts = [vqa_normalize(r) for r in refs]
        if len(gts) == 1:
            return float(p == gts[0])
        accs = [min(1.0, sum(g == p for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
        return sum(accs) / len(accs)


# --------------------------------------------------------------------------------------------- ANLS


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


class ANLS(Metric):
    """DocVQA's ANLS: max over references of 1 - NL (NL = edit distance / longer length, answers lower-cased
    with whitespace collapsed), counted as 0 when NL >= ``threshold`` (0.5)."""

    name = "anls"
    threshold = 0.5

    def score(self, pred: str, refs: list[str]) -> float:
        p = " ".join(pred.strip().lower().split())
        best = 0.0
        for ref in refs:
            r = " ".join(ref.strip().lower().split())
            nl = levenshtein(p, r) / max(len(p), len(r), 1)
            best = max(best, 1.0 - nl if nl < self.threshold else 0.0)
        return best


# ---------------------------------------------------------------------------------- multiple choice


def choose_by_likelihood(choices: Sequence[str], logprobs: Sequence[float]) -> str:
    """The choice with the highest log-likelihood (the first one on ties)."""
    if len(choices) != len(logprobs) or not choices:
        raise ValueError(f"{len(choices)} choices but {len(logprobs)} scores")
    return choices[max(range(len(choices)), key=lambda i: logprobs[i])]


class MultipleChoice(Metric):
    """Accuracy of the chosen option: the prediction is the choice :func:`choose_by_likelihood` picked, the
    reference the gold choice."""

    name = "multiple_choice"
    scores_generated = False

    def score(self, pred: str, refs: list[str]) -> float:
        return float(pred.strip() in {r.strip() for r in refs})


# -------------------------------------------------------------------------------------------- CIDEr


class CIDEr(Metric):
    """CIDEr-D (Vedantam et al. 2015) as the COCO caption evaluation computes it (pycocoevalcap's ``Cider``)
    over all captions collected. Tokens are lower-cased words without punctuation (the COCO pipeline's PTB
    tokenizer needs Java). Document frequencies come from the references, so the score is corpus-level."""

    name = "cider"

    @staticmethod
    def tokenize(text: str) -> str:
        return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))

    def compute(self) -> float:
        if not self.items:
            return float("nan")
        try:
            from pycocoevalcap.cider.cider import Cider
        except ImportError as exc:
            raise RecipeError("the cider metric needs pycocoevalcap: pip install 'vlkit[eval]'",
                              "eval.metrics") from exc
        gts = {i: [self.tokenize(r) for r in refs] for i, (_, refs) in enumerate(self.items)}
        res = {i: [self.tokenize(pred)] for i, (pred, _) in enumerate(self.items)}
        score, _ = Cider().compute_score(gts, res)
        return float(score)


# --------------------------------------------------------------------------------------------- registry

METRICS: dict[str, type[Metric]] = {m.name: m for m in (ExactMatch, VQAAccuracy, ANLS, MultipleChoice, CIDEr)}


def check_metric_names(names: Sequence[str], where: str = "eval.metrics", generated: bool = False) -> None:
    """RecipeError naming an unknown metric (with a suggestion) or a duplicate; ``generated``: also one that
    cannot score generated answers (in-loop validation)."""
    if not names:
        raise RecipeError(f"name at least one metric ({', '.join(METRICS)})", where)
    for i, name in enumerate(names):
        if name not in METRICS:
            close = difflib.get_close_matches(name, list(METRICS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"unknown metric {name!r}.{hint} Metrics: {', '.join(METRICS)}", f"{where}[{i}]")
        if list(names).index(name) != i:
            raise RecipeError(f"metric {name!r} is listed twice", f"{where}[{i}]")
        if generated and not METRICS[name].scores_generated:
            raise RecipeError(f"{name} ranks a sample's choices by likelihood, but validation scores generated "
                              "answers; run a multiple-choice lmms-eval task through `vlkit eval` (or a sweep's "
                              "`eval:` block) instead", f"{where}[{i}]")


def build_metrics(names: Sequence[str]) -> list[Metric]:
    """Fresh metrics for the given names (validated as in a recipe)."""
    check_metric_names(names)
    return [METRICS[n]() for n in names]
