"""Calibrated judgements: an LLM's choice among lettered options, read as probabilities, with the
model's own prior over the options divided out.

In: questions (a prompt that ends in options lettered ``A.``, ``B.``, ...; ``lettered``), asked
through the engine seam for the log-probability of each letter as the answer's first token (a
``Prompt`` with ``options``: vLLM's ``logprob_token_ids``), and the ``JudgeSpec``. Out: a
``Judgement``: per question, the raw probabilities over its options (the letters' probabilities
renormalised over the letters), the calibrated ones, and the confidence (the calibrated
probability of the option chosen); per kind of question, the prior that calibration divided out
and the method used.

A small model's raw answer is dominated by one label and one position (on a 5-topic news set,
Qwen2.5-0.5B answered the first label for 80 % of the texts); that bias is a prior over the
options, the same for every text, and dividing it out is calibration
(``judge.calibration``):

- ``batch`` (Zhou et al. 2023, "Batch Calibration: Rethinking Calibration for In-Context
  Learning and Prompt Engineering", ICLR 2024): the prior is the mean of the raw probabilities
  over the pass's questions of a kind. A kind with fewer than ``min_batch`` answered questions is
  too small to estimate it from and is calibrated content-free instead (reported as such).
- ``content_free`` (Zhao et al. 2021, "Calibrate Before Use: Improving Few-Shot Performance of
  Language Models", ICML): the prior is the mean raw probabilities of the same question asked of
  the content-free inputs ``CONTENT_FREE``.
- ``none``: the raw probabilities (the prior reported is uniform).

Calibrated probabilities are ``raw / prior``, renormalised over the options. Questions of one
``kind`` share their options and are calibrated together (a multi-label run asks a yes/no
question per label: one kind a label).
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from anyclf_ray.core.config import MAX_OPTIONS, JudgeSpec
from anyclf_ray.core.results import Usage
from anyclf_ray.llm import engine

LETTERS = string.ascii_uppercase[:MAX_OPTIONS]
# Zhao et al. 2021's content-free inputs; their probabilities are averaged.
CONTENT_FREE = ("N/A", "", "[MASK]")
# Priors are clipped here, so that an option the model never says is not divided by zero.
MIN_PRIOR = 1e-9


def lettered(options: list[str]) -> str:
    """``options`` as the prompt lists them, one a line: ``A. first``, ``B. second``...

    Raises ValueError past ``MAX_OPTIONS`` options."""
    if len(options) > len(LETTERS):
        raise ValueError(f"{len(options)} options; a judgement letters at most {len(LETTERS)}")
    return "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))


@dataclasses.dataclass(frozen=True)
class Question:
    """One choice to ask: its ``request_id`` (unique in the pass), its ``prompt`` (ending in
    ``lettered`` options), how many options, and its ``kind``: questions of a kind share their
    options and are calibrated together."""

    request_id: str
    prompt: str
    n_options: int
    kind: int = 0


def request(question: Question) -> dict:
    """The engine request of ``question`` (``engine.REQUEST_FIELDS``): one token, at temperature 0,
    whose log-probability for each option letter is read."""
    return {"request_id": question.request_id, "prompt": question.prompt, "item_key": "option", "n_items": 1,
            "max_chars": 1, "max_tokens": 1, "temperature": 0.0, "options": list(LETTERS[: question.n_options])}


def probabilities(logprobs: list[list[float] | None], n_options: int) -> np.ndarray:
    """``(questions, n_options)`` probabilities from each question's option log-probabilities
    (softmax over the options: mass on other tokens is left out); NaN rows where None."""
    found = np.full((len(logprobs), n_options), np.nan)
    for i, row in enumerate(logprobs):
        if row is not None:
            values = np.asarray(row, float)
            values = np.exp(values - values.max())
            found[i] = values / values.sum()
    return found


def calibrated(raw: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """``raw`` probabilities (``(questions, options)``) divided by ``prior`` (``(options,)``, or
    one row a question) and renormalised; NaN rows stay NaN."""
    found = raw / np.maximum(prior, MIN_PRIOR)
    return found / found.sum(axis=1, keepdims=True)


def calibrated_by_kind(raw: np.ndarray, of_kind: np.ndarray, priors: np.ndarray, kinds: list[str]) -> np.ndarray:
    """``raw`` (``(questions, options)``, the kind of each in ``of_kind``) calibrated by its kind's
    row of ``priors``; a kind whose method is ``none`` keeps its raw probabilities exactly."""
    calibrating = np.isin(of_kind, [kind for kind, method in enumerate(kinds) if method != "none"])
    return np.where(calibrating[:, None], calibrated(raw, priors[of_kind]), raw)


def batch_prior(raw: np.ndarray) -> np.ndarray | None:
    """Batch calibration's prior: the mean raw probabilities of the answered rows (None: none)."""
    answered = raw[~np.isnan(raw).any(axis=1)]
    return answered.mean(axis=0) if len(answered) else None


@dataclasses.dataclass
class Judgement:
    """A pass's judgements. ``raw`` and ``probabilities``: ``(questions, options)``, NaN rows where
    the question was not answered after its retries; ``priors``: ``(kinds, options)``, the prior
    divided out of each kind; ``calibration``: the method each kind was calibrated with."""

    raw: np.ndarray
    probabilities: np.ndarray
    priors: np.ndarray
    calibration: list[str]
    usage: Usage

    @property
    def answered(self) -> np.ndarray:
        return ~np.isnan(self.probabilities).any(axis=1)

    @property
    def choice(self) -> np.ndarray:
        """Each question's likeliest option after calibration (-1 where unanswered)."""
        return np.where(self.answered, np.nan_to_num(self.probabilities, nan=-1.0).argmax(axis=1), -1)

    @property
    def confidence(self) -> np.ndarray:
        """The calibrated probability of each question's choice (NaN where unanswered)."""
        found = np.full(len(self.probabilities), np.nan)
        found[self.answered] = self.probabilities[self.answered].max(axis=1)
        return found


def methods(per_kind: np.ndarray, settings: JudgeSpec) -> list[str]:
    """Each kind's calibration for a pass of ``per_kind`` questions a kind: the spec's, but
    content-free for a batch below ``min_batch``."""
    return [settings.calibration if settings.calibration != "batch" or n >= settings.min_batch else "content_free"
            for n in per_kind]


def blank_questions(kinds: list[str], per_kind: np.ndarray, blanks: Callable[[int, str], str],
                    n_options: int) -> list[Question]:
    """The content-free questions of the kinds calibrated content-free (``kinds``: each kind's
    method) that have questions; ``blanks(kind, text)`` asks a kind's question of ``text``."""
    return [Question(f"content_free:{kind}:{i}", blanks(kind, text), n_options, kind)
            for kind, method in enumerate(kinds) if method == "content_free" and per_kind[kind]
            for i, text in enumerate(CONTENT_FREE)]


def priors(kinds: list[str], means: np.ndarray, blank_raw: np.ndarray,
           blank_kinds: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Each kind's prior (``(kinds, options)``) and the method it was calibrated with in the end:
    ``means``, the kinds' mean raw probabilities over the pass (NaN rows: none answered), for
    batch; the mean of the answered content-free ``blank_raw`` rows of the kind, for
    content-free; uniform for none, and for a kind whose prior could not be estimated
    (reported as ``none``: never guessed)."""
    found, used = np.full(means.shape, 1.0 / means.shape[1]), list(kinds)
    for kind, method in enumerate(kinds):
        prior = None
        if method == "batch":
            prior = None if np.isnan(means[kind]).any() else means[kind]
        elif method == "content_free":
            prior = batch_prior(blank_raw[blank_kinds == kind])
        if prior is None:
            used[kind] = "none"
        else:
            found[kind] = prior
    return found, used


def plan(questions: list[Question], n_kinds: int, blanks: Callable[[int, str], str],
         settings: JudgeSpec) -> tuple[list[Question], list[str]]:
    """Every question a judgement asks, ``questions`` then the content-free ones, and each kind's
    calibration method. Raises ValueError unless every question has as many options."""
    sizes = {question.n_options for question in questions}
    if len(sizes) > 1:
        raise ValueError(f"one judgement asks questions of one size of option list, not {sorted(sizes)}")
    per_kind = np.bincount([question.kind for question in questions], minlength=n_kinds)
    kinds = methods(per_kind, settings)
    return [*questions, *blank_questions(kinds, per_kind, blanks, sizes.pop() if sizes else 2)], kinds


def judge(answer: Callable[[pa.Table], pa.Table], questions: list[Question], n_kinds: int,
          blanks: Callable[[int, str], str], settings: JudgeSpec) -> Judgement:
    """Ask ``questions`` (and the content-free ones ``plan`` adds; ``blanks(kind, text)`` is a
    question of that kind about the content-free input ``text``) through ``answer`` (requests →
    answered requests: the run's engine pool) and calibrate them per kind. A question unanswered
    after its retries is a NaN row, left out of the priors."""
    asked, kinds = plan(questions, n_kinds, blanks, settings)
    k = asked[0].n_options if asked else 2
    answers = answer(engine.requests_table([request(question) for question in asked]))
    by_id = dict(zip(answers["request_id"].to_pylist(), answers["option_logprobs"].to_pylist()))
    raw_all = probabilities([by_id[question.request_id] for question in asked], k)
    raw, blank_raw = raw_all[: len(questions)], raw_all[len(questions) :]
    of_kind = np.array([question.kind for question in asked], int)
    asked_kinds = of_kind[: len(questions)]
    means = np.full((n_kinds, k), np.nan)
    for kind in range(n_kinds):
        mean = batch_prior(raw[asked_kinds == kind])
        if mean is not None:
            means[kind] = mean
    found_priors, used = priors(kinds, means, blank_raw, of_kind[len(questions) :])
    probabilities_ = calibrated_by_kind(raw, asked_kinds, found_priors, used)
    return Judgement(raw=raw, probabilities=probabilities_, priors=found_priors, calibration=used,
                     usage=engine.usage(answers))
