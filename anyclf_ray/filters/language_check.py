"""Language check stage: rows not written in the language they were asked in.

A ``FilterStage`` (``stage.py``). In: the rows the stage before it committed, each with the
``language`` it was requested in. Out, under ``<run>/language_check/``:

- ``data/part-*.parquet``: the kept rows, with ``detected_language`` and ``language_confidence``
  (the detector's confidence that the text is in its requested language);
- ``removed/part-*.parquet``: the other rows, with ``reason``: ``wrong_language`` (another
  language was detected) or ``low_confidence`` (the requested one, but below
  ``min_confidence``);
- ``languages.png``: rows by requested and detected language;
- ``manifest.json``: the same counts, and (as every filter's) removals per language and label.

The detector is lingua (``lingua-language-detector``): its models ship in the wheel, so it runs
offline, and it is the most accurate of the offline detectors on short texts. It knows 75
languages; a spec asking for another fails before any work (``check``). It weighs the run's
languages, English and ``also_detect``, not all 75: on 9,903 real English texts, weighing all
75 put another language first for 4.5% of them and English below 0.2 confidence for 13% more;
weighing English and French, 0.3% and none (``bench/language_check.py``).
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import pyarrow as pa

from anyclf_ray.core import plots
from anyclf_ray.core.config import LanguageCheckSpec
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.core.results import LanguageCheckReport, counts
from anyclf_ray.core.stage import Context, Decision, FilterStage
from anyclf_ray.core.storage import RunLocation

log = logging.getLogger(__name__)

REASONS = ("wrong_language", "low_confidence")
UNDETECTED = "unknown"


def lingua_language(code: str):
    """lingua's ``Language`` for an ISO 639-1 or 639-3 ``code``; ValueError if it has none."""
    from lingua import IsoCode639_1, IsoCode639_3, Language

    try:
        if len(code) == 2:
            return Language.from_iso_code_639_1(IsoCode639_1.from_str(code.lower()))
        return Language.from_iso_code_639_3(IsoCode639_3.from_str(code.lower()))
    except ValueError:
        raise ValueError(f"the language check cannot detect {code!r}") from None


@functools.cache
def detector(codes: tuple[str, ...]):
    """One detector per process and language set, weighing only ``codes``."""
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_languages(*{lingua_language(code) for code in codes}).build()


def weighed(requested: list[str], also: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(set(requested) | set(also)))


def detect(texts: list[str], requested: list[str], also: tuple[str, ...] = ("en",)) -> tuple[list[str], np.ndarray]:
    """Each text's detected language among the ``requested`` ones and ``also`` (its ISO code as
    given there, or ``unknown``) and the confidence that it is in its ``requested`` language."""
    codes = weighed(requested, also)
    wanted = {code: lingua_language(code) for code in codes}
    spelled = {language: code for code, language in wanted.items()}
    found = detector(codes).compute_language_confidence_values_in_parallel(texts)
    detected, confidence = [], np.zeros(len(texts))
    for i, (values, code) in enumerate(zip(found, requested)):
        if not values or values[0].value == 0:
            detected.append(UNDETECTED)
            continue
        detected.append(spelled[values[0].language])
        confidence[i] = next(v.value for v in values if v.language == wanted[code])
    return detected, confidence


class LanguageCheck(FilterStage[LanguageCheckReport, None]):
    """The language check on the stage contract, shard by shard: a row's language is its own."""

    name = "language_check"
    section = "language_check"
    report_type = LanguageCheckReport
    card_config = "language_checked"
    row_by_row = True

    @property
    def settings(self) -> LanguageCheckSpec:
        return self.spec.language_check

    @property
    def reasons(self) -> tuple[str, ...]:
        return REASONS

    def check(self, location: RunLocation) -> None:
        for field, codes in (("languages", self.spec.languages),
                             ("language_check.also_detect", self.settings.also_detect)):
            for code in codes:
                try:
                    lingua_language(code)
                except ValueError as error:
                    raise ConfigError(f"{field}: {error}; remove it or set language_check.enabled: false") from None

    def decide(self, ctx: Context, rows: pa.Table, checked: None) -> Decision:
        # The run's languages, not this shard's: every shard is read by the same detector.
        requested = rows["language"].to_pylist()
        also = ("en", *self.settings.also_detect, *self.spec.languages)
        detector(weighed(requested, also))  # built, its models loaded, before the clock starts
        started = time.perf_counter()
        detected, confidence = detect(rows["text"].to_pylist(), requested, also)
        seconds = time.perf_counter() - started
        wrong = np.asarray([d != r for d, r in zip(detected, requested)])
        low = ~wrong & (confidence < self.settings.min_confidence)
        out = rows.append_column("detected_language", pa.array(detected, pa.string()))
        out = out.append_column("language_confidence", pa.array(confidence, pa.float32()))
        removing = wrong | low
        reason = np.where(wrong, "wrong_language", "low_confidence")[removing]
        return Decision(
            kept=out.filter(pa.array(~removing)),
            removed=out.filter(pa.array(removing)).append_column("reason", pa.array(reason.tolist(), pa.string())),
            counts={"requested_by_detected": counts(out, ["language", "detected_language"])},
            timings={"detect": seconds},
        )

    def summarise(self, ctx: Context, totals: dict[str, list[dict]], rows: int, timings: dict) -> dict:
        matrix = totals["requested_by_detected"]
        columns = sorted({row["detected_language"] for row in matrix})
        by_pair = {(row["language"], row["detected_language"]): row["rows"] for row in matrix}
        png = plots.heatmap(
            np.asarray([[by_pair.get((r, d), 0) for d in columns] for r in self.spec.languages]),
            self.spec.languages, columns, "requested", "detected", "rows by requested and detected language")
        ctx.location.write_bytes(self.data_path("languages.png"), png)
        seconds = timings["detect"]
        log.info("language_check: %d rows in %.1f s", rows, seconds)
        return {"requested_by_detected": matrix, "figure": self.data_path("languages.png"),
                "rows_per_second": round(rows / seconds, 1) if seconds else None}
