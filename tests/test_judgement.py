"""Calibrated judgements (``judgement.py``) on known log-probabilities: the arithmetic of batch
and content-free calibration, kinds calibrated apart, fallbacks said out loud. No Ray, no LLM:
the label check's tests run the same code behind the engine seam, and a real-vLLM run reads
the option letters' log-probabilities in test_bad_input_runs.py and test_multi_label.py."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import OptionJudge

from anyclf_ray.core.config import JudgeSpec, SamplingSpec
from anyclf_ray.llm import engine, judgement
from anyclf_ray.llm.judgement import Question


def test_batch_calibration_divides_by_the_mean_and_renormalises():
    raw = np.array([[0.8, 0.2], [0.6, 0.4]])
    prior = judgement.batch_prior(raw)
    assert prior == pytest.approx([0.7, 0.3], abs=1e-15)
    # (0.8/0.7) / (0.8/0.7 + 0.2/0.3) = 12/19; (0.6/0.7) / (0.6/0.7 + 0.4/0.3) = 9/23.
    expected = np.array([[12 / 19, 7 / 19], [9 / 23, 14 / 23]])
    assert judgement.calibrated(raw, prior) == pytest.approx(expected, abs=1e-15)
    assert judgement.batch_prior(np.full((2, 2), np.nan)) is None


def test_probabilities_are_renormalised_over_the_options():
    found = judgement.probabilities([[np.log(0.2), np.log(0.6)], None], 2)  # 0.2 of the mass elsewhere
    assert found[0] == pytest.approx([0.25, 0.75], abs=1e-15) and np.isnan(found[1]).all()


def judge(weigh, questions, n_kinds, blanks, **settings) -> judgement.Judgement:
    fake = OptionJudge(weigh)
    return judgement.judge(lambda requests: engine.answer(fake, requests, SamplingSpec(max_retries=1)),
                           questions, n_kinds, blanks, JudgeSpec(**settings))


def ask(kind: int, text: str) -> str:
    return f"Kind {kind}.\n<text>\n{text}\n</text>\nA. yes\nB. no"


def leaning(text, options, prompt):
    """Kind 0 leans to yes (a yes-text 0.9, a no-text 0.6); kind 1 to no (0.4 and 0.1); blanks
    (N/A, "", [MASK]) 0.75 and 0.25 whatever the kind."""
    if text in judgement.CONTENT_FREE:
        return [0.75, 0.25]
    high, low = (0.9, 0.6) if prompt.startswith("Kind 0") else (0.4, 0.1)
    return [high, 1 - high] if "yes" in text else [low, 1 - low]


QUESTIONS = [Question(f"q{kind}-{i}", ask(kind, "yes" if i % 2 else "no"), 2, kind) for kind in (0, 1)
             for i in range(20)]


def test_kinds_are_calibrated_apart_on_their_own_mean():
    found = judge(leaning, QUESTIONS, 2, ask)
    assert found.calibration == ["batch", "batch"] and found.usage.requests == 40
    assert found.priors == pytest.approx(np.array([[0.75, 0.25], [0.25, 0.75]]), abs=1e-12)
    yes = np.array([i % 2 == 1 for i in range(20)] * 2)
    assert (found.choice == np.where(yes, 0, 1)).all()  # raw, kind 0 says yes and kind 1 no to all
    assert (found.raw.argmax(axis=1) == np.repeat([0, 1], 20)).all()
    # Kind 0: yes-text (0.9/0.75) / (0.9/0.75 + 0.1/0.25) = 3/4; no-text (0.4/0.25) / (0.8 + 1.6) = 2/3.
    assert found.confidence[:20] == pytest.approx(np.where(yes[:20], 3 / 4, 2 / 3), abs=1e-12)
    assert found.confidence[20:] == pytest.approx(np.where(yes[20:], 2 / 3, 3 / 4), abs=1e-12)


def test_a_pass_smaller_than_min_batch_is_calibrated_content_free():
    found = judge(leaning, QUESTIONS[:6] + QUESTIONS[20:40], 2, ask)
    assert found.calibration == ["content_free", "batch"]
    assert found.usage.requests == 6 + 20 + 3  # the blanks of kind 0 only, in the same pass
    assert found.priors[0] == pytest.approx([0.75, 0.25], abs=1e-12)


@pytest.mark.parametrize("calibration", ["content_free", "none"])
def test_content_free_and_uncalibrated_judgements(calibration):
    found = judge(leaning, QUESTIONS, 2, ask, calibration=calibration)
    assert found.calibration == [calibration] * 2
    assert found.usage.requests == 40 + 6 * (calibration == "content_free")
    expected = [[0.75, 0.25]] * 2 if calibration == "content_free" else [[0.5, 0.5]] * 2
    assert found.priors == pytest.approx(np.array(expected), abs=1e-12)
    if calibration == "none":
        assert np.array_equal(found.probabilities, found.raw, equal_nan=True)


def test_unanswered_questions_are_nan_and_left_out_of_the_prior():
    def silent_on_third(text, options, prompt):
        return None if text.endswith("!") else leaning(text, options, prompt)

    questions = [*QUESTIONS[:20], Question("q-silent", ask(0, "no!"), 2, 0)]
    found = judge(silent_on_third, questions, 1, ask)
    assert found.answered.tolist() == [True] * 20 + [False]
    assert np.isnan(found.probabilities[20]).all() and np.isnan(found.confidence[20]) and found.choice[20] == -1
    assert found.usage.failed == 1 and found.priors[0] == pytest.approx([0.75, 0.25], abs=1e-12)


def test_content_free_questions_that_all_fail_leave_the_kind_uncalibrated():
    mute_blanks = functools.partial(lambda weigh, text, options, prompt: None if text in judgement.CONTENT_FREE
                                    else weigh(text, options, prompt), leaning)
    found = judge(mute_blanks, QUESTIONS[:6], 1, ask)
    assert found.calibration == ["none"] and found.priors[0] == pytest.approx([0.5, 0.5])


def test_one_judgement_asks_one_size_of_option_list():
    with pytest.raises(ValueError, match=r"one size of option list, not \[2, 3\]"):
        judgement.plan([Question("a", "x", 2), Question("b", "y", 3)], 1, ask, JudgeSpec())
    with pytest.raises(ValueError, match="27 options; a judgement letters at most 26"):
        judgement.lettered([str(i) for i in range(27)])
