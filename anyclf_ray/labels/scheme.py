"""Label schemes: all that differs between rows that carry one label and rows that carry a set.

In: the spec (its label set and its ``multi_label`` section). Out: the run's ``LabelScheme``
(``scheme(spec)``), the one place that knows which kind of run it is. It owns:

- rows: the label columns (``fields``), a row's labels as a 0/1 row per label (``members``),
  the one string column rows are grouped and counted by (``key``), the run's counts;
- planning: the label sets rows are planned for (each label alone, or the allowed sets of
  ``label_sets``), every leaf's samples, the leaves' ids and the generation prompt's label lines;
- judging: the llm judge's questions (``judgement.py``), their verdicts, and why a row fails;
- training: the targets (a label's position, or a 0/1 row per label: the two target types of
  SetFit's models), the pair sampler, the head (SetFit's ``one-vs-rest`` for sets), the
  held-out splits (a set's thresholds are tuned on half of them), tallies and figures;
- predictions: the columns ``predict`` writes.

A single-label run is planned as the sets of one label each, so the planning code is one.
"""

from __future__ import annotations

import abc
import collections
import json
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from anyclf_ray.core import cards, plots
from anyclf_ray.core.config import LABEL_SET_SEPARATOR, EvalSetSpec, JobSpec, decisive
from anyclf_ray.core.ids import stable_id
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.labels import label_sets, metrics, pairs
from anyclf_ray.llm import judgement, prompts
from anyclf_ray.llm.judgement import Judgement, Question

# Tallies of one batch, to add up: a confusion matrix, or counts per label (``metrics``).
Tally = np.ndarray
# A run's row after its label columns: its language and where in the tree it comes from.
ROW_FIELDS = [pa.field("language", pa.string()), pa.field("source_type", pa.string()), pa.field("topic", pa.string()),
              pa.field("subtopic", pa.string()), pa.field("leaf_id", pa.string()), pa.field("sample_index", pa.int32()),
              pa.field("model", pa.string())]
# A run with annotation (``annotate.py``) has two sources; its rows say which one wrote them, and
# an annotated row carries the judgement it was labelled by (null for a generated row).
ORIGINS = ("generated", "annotated")
ORIGIN_FIELDS = [pa.field("origin", pa.string()),
                 # The calibrated probability of each label (one label a row), or of yes to it (sets).
                 pa.field("probabilities", pa.list_(pa.float32())),
                 pa.field("confidence", pa.float32())]


class LabelScheme(abc.ABC):
    """The run kind's rows, plan, judge, training, evaluation and predictions."""

    # The string column rows are grouped and counted by: a label id, or a set's ids joined.
    key: ClassVar[str]
    # A row's label columns.
    fields: ClassVar[list[pa.Field]]
    # The card's words for them.
    columns_text: ClassVar[str]
    # Why the llm judge fails a row (``label_check``).
    judge_reasons: ClassVar[tuple[str, ...]]
    # SetFit's multi_target_strategy, and the evaluation figure's name.
    strategy: ClassVar[str | None]
    figure: ClassVar[str]
    # The model card's words for the head and the line that predicts with it.
    head_text: ClassVar[str]
    usage_text: ClassVar[str]

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.ids = [label.id for label in spec.labels]
        self.descs = [label.desc for label in spec.labels]
        self.position = {label: i for i, label in enumerate(self.ids)}

    # -- rows ------------------------------------------------------------------------------------

    @property
    def row_schema(self) -> pa.Schema:
        """The run's rows: ``id``, ``text``, the label columns, ``ROW_FIELDS``, and in a run that
        annotates, ``ORIGIN_FIELDS``."""
        origin = ORIGIN_FIELDS if self.spec.annotate.enabled else []
        return pa.schema([pa.field("id", pa.string()), pa.field("text", pa.string()), *self.fields, *ROW_FIELDS,
                          *origin])

    @abc.abstractmethod
    def columns(self, labels: list[list[str]]) -> dict[str, pa.Array]:
        """The label columns of rows whose label ids are ``labels`` (one list a row)."""

    @abc.abstractmethod
    def labels_of(self, key: str) -> list[str]:
        """The label ids a ``key`` value holds."""

    def key_of(self, labels: list[str]) -> str:
        """The ``key`` value of a row with ``labels``."""
        return LABEL_SET_SEPARATOR.join(sorted(labels, key=self.position.__getitem__))

    def members(self, keys: list[str]) -> np.ndarray:
        """``(rows, labels)`` booleans: the labels each row's ``key`` value holds."""
        found = np.zeros((len(keys), len(self.ids)), bool)
        for row, key in enumerate(keys):
            found[row, [self.position[label] for label in self.labels_of(key)]] = True
        return found

    def ids_of(self, members: np.ndarray) -> list[list[str]]:
        return [[self.ids[i] for i in np.flatnonzero(row)] for row in members]

    @abc.abstractmethod
    def allowed(self, members: np.ndarray) -> np.ndarray:
        """Whether each row's labels make a set the run writes (one label; an allowed set)."""

    @property
    @abc.abstractmethod
    def decisive(self) -> dict:
        """What of the spec, beyond the label set, decides which labels a row may carry (a
        fingerprint's part)."""

    def shown(self, label: str) -> str:
        """How a figure names ``label`` (an id): its description, and the id where it differs."""
        desc = self.descs[self.position[label]]
        return desc if desc == label else f"{desc} ({label})"

    def per_label(self, rows: pa.Table) -> pa.Table:
        """``rows`` once for each label they hold, under ``label`` (a row of no label is in no
        label's figures): what per-label figures read."""
        held = self.members(rows[self.key].to_pylist())
        row, label = np.nonzero(held)
        rows = rows.drop_columns([field.name for field in self.fields if field.name in rows.column_names])
        return rows.take(pa.array(row)).append_column("label", pa.array([self.ids[i] for i in label], pa.string()))

    def counts(self, written: pa.Table) -> dict[str, list[dict]]:
        """The manifest's counts from rows per (``key``, language) (``written``, a ``rows``
        column): per label and (label, language), a row counting once for each of its labels."""
        by_label: collections.Counter = collections.Counter()
        by_label_language: collections.Counter = collections.Counter()
        for row in written.to_pylist():
            for label in self.labels_of(row[self.key]):
                by_label[label] += row["rows"]
                by_label_language[label, row["language"]] += row["rows"]
        return {"by_label": [{"label": label, "rows": n} for label, n in sorted(by_label.items())],
                "by_label_language": [{"label": label, "language": language, "rows": n}
                                      for (label, language), n in sorted(by_label_language.items())]}

    def co_occurrence(self, written: pa.Table) -> np.ndarray | None:
        """Rows holding both label i and label j (the diagonal: rows holding i); None where a row
        holds one label."""
        return None

    # -- planning ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def sets(self, prior: dict[str, float] | None = None) -> list[tuple[int, ...]]:
        """The label sets rows are planned for, as label positions."""

    def members_of_sets(self, prior: dict[str, float] | None = None) -> np.ndarray:
        """``(sets, labels)`` booleans: the labels each planned set holds."""
        found = np.zeros((len(sets := self.sets(prior)), len(self.ids)), bool)
        for i, members in enumerate(sets):
            found[i, list(members)] = True
        return found

    @abc.abstractmethod
    def leaf_samples(self, on_leaf: np.ndarray, row_label: np.ndarray,
                     prior: dict[str, float] | None = None) -> Iterator[tuple[np.ndarray, ...]]:
        """Every (language, tree row, set, samples) leaf, in groups of four int32 arrays sorted
        by language (the plan adds them up group by group). ``on_leaf[language, row]``: whether a
        tree row is a leaf of that language; ``row_label``: each row's label position."""

    @abc.abstractmethod
    def check(self) -> None:
        """ConfigError naming the fix when the rows cannot hold the plan's sets."""

    @abc.abstractmethod
    def leaf_key(self, labels: list[str], tree_label: str) -> str:
        """What a leaf's id is made of, besides its language and tree position."""

    @abc.abstractmethod
    def prompt(self, labels: list[str], language: str | None) -> tuple[str, dict[str, str]]:
        """The generation template for rows of ``labels``, and its label fields."""

    def labels_text(self, language: str | None = None) -> str:
        """The label list the LLM reads, in ``language`` where the spec gives it."""
        return json.dumps([self.label_text(label.id, language) for label in self.spec.labels], ensure_ascii=False)

    def label_text(self, label: str, language: str | None) -> str:
        """A label's description as the prompts of ``language`` show it."""
        found = self.spec.labels[self.position[label]]
        return found.desc_by_language.get(language, found.desc) if language else found.desc

    # -- the llm judge -----------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def judge_size(self) -> int:
        """Questions the judge asks of a row, each of its own kind (``Question.kind``: calibrated
        on its own)."""

    @abc.abstractmethod
    def judge_questions(self, row_id: str, text: str, asker: str = "label_check") -> list[Question]:
        """The questions the judge is asked of a row's text, kinds 0 to ``judge_size - 1``; their
        request ids are the ``asker``'s."""

    @abc.abstractmethod
    def judge_blank(self, kind: int, text: str) -> str:
        """A question of ``kind`` asked of the content-free input ``text``."""

    @abc.abstractmethod
    def judged(self, found: Judgement) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """From the judgements of rows' questions (``judge_size`` a row, in order): the labels each
        row's text is judged to express (rows × labels booleans), whether every question of the
        row was answered, and the row's confidence (NaN where unanswered)."""

    @abc.abstractmethod
    def label_probabilities(self, found: Judgement) -> np.ndarray:
        """``(rows, labels)``: each row's calibrated probability of each label (one label a row)
        or of yes to each label (sets), from its questions' judgements."""

    def judge_table(self, missing: dict[str, int] | None, extra: dict[str, int] | None) -> str | None:
        """The card's table of the judge's verdicts against the rows' sets, by label (rows whose set
        holds a label the judge finds absent, ``missing``, and the reverse, ``extra``); None where a
        row carries one label (the card's per-method table says it)."""
        return None

    @abc.abstractmethod
    def judge_prior(self, found: Judgement) -> dict[str, float]:
        """The prior calibration divided out, by label: the probability of answering it (one
        label a row) or of answering yes to it (sets)."""

    @abc.abstractmethod
    def judge_reason(self, missing: np.ndarray, extra: np.ndarray) -> np.ndarray:
        """Why each failing row fails, from its labels judged absent and present."""

    @abc.abstractmethod
    def verdicts(self, judged: np.ndarray, answered: np.ndarray) -> tuple[str, pa.Array]:
        """The audit column of the judge's verdicts (null where it did not answer)."""

    @abc.abstractmethod
    def judge_figures(self, intended: np.ndarray, judged: np.ndarray, answered: np.ndarray) -> dict:
        """What the manifest shows of the verdicts against the rows' own labels."""

    # -- training and evaluation -------------------------------------------------------------------

    @abc.abstractmethod
    def targets(self, keys: list[str]) -> np.ndarray:
        """Training targets of rows with these ``key`` values."""

    @abc.abstractmethod
    def check_targets(self, y: np.ndarray) -> None:
        """ConfigError when a label has too few training rows to learn from."""

    @abc.abstractmethod
    def sampler(self, y: np.ndarray, seed: int):
        """The contrastive pair sampler of ``y`` (``labels.pairs``)."""

    @abc.abstractmethod
    def head(self, max_iter: int, seed: int):
        """An unfitted scikit-learn head."""

    @abc.abstractmethod
    def splits(self, test_size: float) -> dict[str, tuple[float, float]]:
        """The held-out draws by use: ``held_out`` (and ``tuning``), as [low, high)."""

    def tune(self, head, tallies: Callable[[str, Callable], Tally | None]) -> np.ndarray | None:
        """Per-label thresholds from the ``tuning`` split (``tallies(split, tally)`` adds a tally
        up over a split's rows); None where predictions are no thresholds' business."""
        return None

    @abc.abstractmethod
    def tally(self, head, thresholds: np.ndarray | None, keys: list[str], vectors: np.ndarray) -> Tally:
        """One batch's tally of the head's predictions against the rows' ``key`` values."""

    @abc.abstractmethod
    def metrics(self, tally: Tally, thresholds: np.ndarray | None) -> dict:
        """A split's figures from its tally."""

    @abc.abstractmethod
    def headline(self, figures: dict) -> dict[str, float]:
        """A split's figures for a card or a summary line."""

    @abc.abstractmethod
    def split_png(self, figures: dict, title: str) -> bytes:
        """A split's figure."""

    # -- real sets and predictions -----------------------------------------------------------------

    @abc.abstractmethod
    def eval_labels(self, values: list, settings: EvalSetSpec) -> list[list[str] | None]:
        """A real set's label values as lists (None: the row gives none, and is skipped)."""


class SingleLabel(LabelScheme):
    """One label a row: ``label`` (its id) and ``label_name``; a classifier with one head."""

    key = "label"
    fields = [pa.field("label", pa.string()), pa.field("label_name", pa.string())]
    columns_text = "`label` (the label id), `label_name`"
    judge_reasons = ("label_mismatch",)
    strategy = None
    figure = "confusion"
    head_text = "logistic regression"
    usage_text = 'model.predict(["some text"])'

    def columns(self, labels: list[list[str]]) -> dict[str, pa.Array]:
        ids = [found[0] if found else None for found in labels]
        return {"label": pa.array(ids, pa.string()),
                "label_name": pa.array([None if i is None else self.descs[self.position[i]] for i in ids], pa.string())}

    def labels_of(self, key: str) -> list[str]:
        return [key]

    def allowed(self, members: np.ndarray) -> np.ndarray:
        return members.sum(axis=1) == 1

    @property
    def decisive(self) -> dict:
        return {"scheme": "single"}

    def sets(self, prior: dict[str, float] | None = None) -> list[tuple[int, ...]]:
        return [(i,) for i in range(len(self.ids))]

    def leaf_samples(self, on_leaf: np.ndarray, row_label: np.ndarray,
                     prior: dict[str, float] | None = None) -> Iterator[tuple[np.ndarray, ...]]:
        """With explicit sizes every leaf gets ``sample_per_subtopic``. With
        ``n_record_to_generate`` the total is split exactly: every leaf gets the floor share and
        the remainder goes one each to leaves taken round-robin across (language, label), so
        classes stay balanced within one."""
        lang, row = (index.astype(np.int32) for index in np.nonzero(on_leaf))
        if self.spec.n_record_to_generate is None:
            samples = np.full(len(lang), self.spec.sample_per_subtopic, np.int32)
        else:
            base, extra = divmod(self.spec.n_record_to_generate, len(lang))
            samples = np.full(len(lang), base, np.int32)
            group = row_label[row] * on_leaf.shape[0] + lang
            # Each leaf's position among its (language, label) group's leaves, in tree order.
            order = np.argsort(group, kind="stable")
            position = np.empty_like(order)
            position[order] = np.arange(len(order)) - np.searchsorted(group[order], group[order])
            samples[np.lexsort((group, position))[:extra]] += 1  # by position, then group: round-robin
        keep = samples > 0
        yield lang[keep], row[keep], row_label[row[keep]].astype(np.int32), samples[keep]

    def check(self) -> None:
        """Nothing to refuse: every label alone is a set."""

    def leaf_key(self, labels: list[str], tree_label: str) -> str:
        return tree_label  # the leaf ids of runs before label sets existed

    def prompt(self, labels: list[str], language: str | None) -> tuple[str, dict[str, str]]:
        return prompts.GENERATE, {"label": self.label_text(labels[0], language)}

    @property
    def judge_size(self) -> int:
        return 1

    def judge_blank(self, kind: int, text: str) -> str:
        return prompts.render(prompts.JUDGE, instruction=self.spec.instruction, text=text,
                              options=judgement.lettered(self.descs))

    def judge_questions(self, row_id: str, text: str, asker: str = "label_check") -> list[Question]:
        return [Question(stable_id(asker, row_id), self.judge_blank(0, text), len(self.ids))]

    def judged(self, found: Judgement) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        answered = found.answered
        judged = np.zeros((len(answered), len(self.ids)), bool)
        judged[np.flatnonzero(answered), found.choice[answered]] = True
        return judged, answered, found.confidence

    def label_probabilities(self, found: Judgement) -> np.ndarray:
        return found.probabilities

    def judge_prior(self, found: Judgement) -> dict[str, float]:
        return {label: round(float(p), 4) for label, p in zip(self.ids, found.priors[0])}

    def judge_reason(self, missing: np.ndarray, extra: np.ndarray) -> np.ndarray:
        return np.full(len(missing), self.judge_reasons[0], dtype=object)

    def verdicts(self, judged: np.ndarray, answered: np.ndarray) -> tuple[str, pa.Array]:
        found = [self.ids[row.argmax()] if ok else None for row, ok in zip(judged, answered)]
        return "judged_label", pa.array(found, pa.string())

    def judge_figures(self, intended: np.ndarray, judged: np.ndarray, answered: np.ndarray) -> dict:
        _, verdicts = self.verdicts(judged, answered)
        own = [self.ids[row.argmax()] for row in intended]
        pairs_ = collections.Counter((a, b) for a, b, ok in zip(own, verdicts.to_pylist(), answered) if ok)
        return {"judged": [{"label": a, "judged": b, "rows": n} for (a, b), n in sorted(pairs_.items())]}

    def targets(self, keys: list[str]) -> np.ndarray:
        return pc.index_in(pa.array(keys, pa.string()), pa.array(self.ids)).to_numpy(zero_copy_only=False)

    def check_targets(self, y: np.ndarray) -> None:
        for label, have in zip(self.ids, np.bincount(y, minlength=len(self.ids))):
            _enough(label, have)

    def sampler(self, y: np.ndarray, seed: int):
        return pairs.PairSampler(y, seed)

    def head(self, max_iter: int, seed: int):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=max_iter, random_state=seed)

    def splits(self, test_size: float) -> dict[str, tuple[float, float]]:
        return {"held_out": (0.0, test_size)}

    def tally(self, head, thresholds: np.ndarray | None, keys: list[str], vectors: np.ndarray) -> Tally:
        return metrics.confusion(self.targets(keys), head.predict(vectors), len(self.ids))

    def metrics(self, tally: Tally, thresholds: np.ndarray | None) -> dict:
        return metrics.metrics(tally, self.ids)

    def headline(self, figures: dict) -> dict[str, float]:
        return {key: figures[key] for key in ("accuracy", "macro_f1", "weighted_f1")}

    def split_png(self, figures: dict, title: str) -> bytes:
        subtitle = f"{title}\n" + ", ".join(f"{key} {value:.3f}" for key, value in self.headline(figures).items())
        labels = [self.shown(label) for label in figures["confusion_matrix"]["labels"]]
        return plots.heatmap(np.asarray(figures["confusion_matrix"]["rows_true_columns_predicted"]), labels, labels,
                             "true", "predicted", subtitle)

    def eval_labels(self, values: list, settings: EvalSetSpec) -> list[list[str] | None]:
        return [[value] if value else None for value in values]  # a blank label is a missing one


class MultiLabel(LabelScheme):
    """A set of labels a row: ``labels``, ``label_names`` and ``label_set`` (the ids joined by
    ``|``, ``""`` for none); a one-vs-rest head with a threshold per label."""

    key = "label_set"
    fields = [pa.field("labels", pa.list_(pa.string())), pa.field("label_names", pa.list_(pa.string())),
              pa.field("label_set", pa.string())]
    columns_text = ("`labels` (the label ids of a multi-label row), `label_names`, `label_set` (the ids joined by "
                    f"`{LABEL_SET_SEPARATOR}`)")
    judge_reasons = ("label_missing", "label_extra")
    strategy = "one-vs-rest"
    figure = "per-label"
    head_text = ("one-vs-rest logistic regression, each label's threshold tuned for F1 on held-out rows "
                 "(`thresholds.json`)")
    usage_text = 'model.predict_proba(["some text"])  # a score per label; cut at thresholds.json'

    def judge_table(self, missing: dict[str, int] | None, extra: dict[str, int] | None) -> str | None:
        header = "| label | in the set, judged absent | outside the set, judged present |\n|---|---|---|\n"
        return header + "".join(f"| {cards.code(label)} | {(missing or {}).get(label, 0)} | "
                                f"{(extra or {}).get(label, 0)} |\n" for label in self.ids)

    def columns(self, labels: list[list[str]]) -> dict[str, pa.Array]:
        ordered = [sorted(found, key=self.position.__getitem__) for found in labels]
        return {"labels": pa.array(ordered, pa.list_(pa.string())),
                "label_names": pa.array([[self.descs[self.position[i]] for i in found] for found in ordered],
                                        pa.list_(pa.string())),
                "label_set": pa.array([LABEL_SET_SEPARATOR.join(found) for found in ordered], pa.string())}

    def labels_of(self, key: str) -> list[str]:
        return key.split(LABEL_SET_SEPARATOR) if key else []

    def allowed(self, members: np.ndarray) -> np.ndarray:
        allowed = {row.tobytes() for row in label_sets.LabelSets(self.spec).members}
        return np.array([row.tobytes() in allowed for row in members], bool)

    @property
    def decisive(self) -> dict:
        return {"scheme": "multi", **decisive(self.spec.multi_label)}

    def co_occurrence(self, written: pa.Table) -> np.ndarray | None:
        found = np.zeros((len(self.ids), len(self.ids)), np.int64)
        for row in written.to_pylist():
            held = [self.position[label] for label in self.labels_of(row[self.key])]
            found[np.ix_(held, held)] += row["rows"]
        return found

    def counts(self, written: pa.Table) -> dict[str, list[dict]]:
        by_size: collections.Counter = collections.Counter()
        by_set: collections.Counter = collections.Counter()
        by_set_language: collections.Counter = collections.Counter()
        for row in written.to_pylist():
            by_size[len(self.labels_of(row[self.key]))] += row["rows"]
            by_set[row[self.key]] += row["rows"]
            by_set_language[row[self.key], row["language"]] += row["rows"]
        return {**super().counts(written),
                "by_label_set": [{"label_set": key, "rows": n} for key, n in sorted(by_set.items())],
                "by_label_set_language": [{"label_set": key, "language": language, "rows": n}
                                          for (key, language), n in sorted(by_set_language.items())],
                "by_set_size": [{"size": size, "rows": n} for size, n in sorted(by_size.items())]}

    def sets(self, prior: dict[str, float] | None = None) -> list[tuple[int, ...]]:
        return label_sets.LabelSets(self.spec, prior).sets

    def leaf_samples(self, on_leaf: np.ndarray, row_label: np.ndarray,
                     prior: dict[str, float] | None = None) -> Iterator[tuple[np.ndarray, ...]]:
        sets = label_sets.LabelSets(self.spec, prior)
        return label_sets.leaf_samples(self.spec, sets, on_leaf, row_label)

    def check(self) -> None:
        label_sets.check(self.spec)

    def leaf_key(self, labels: list[str], tree_label: str) -> str:
        return json.dumps([labels, tree_label])  # a set on one member's subtree

    def prompt(self, labels: list[str], language: str | None) -> tuple[str, dict[str, str]]:
        wanted = [self.label_text(label, language) for label in labels]
        others = [self.label_text(label, language) for label in self.ids if label not in labels]
        return prompts.GENERATE_MULTI, {"label_rules": prompts.label_set_rules(wanted, others)}

    # A yes/no question per label; a kind per label, each with its own prior.
    ANSWERS = ["yes", "no"]

    @property
    def judge_size(self) -> int:
        return len(self.ids)

    def judge_blank(self, kind: int, text: str) -> str:
        return prompts.render(prompts.JUDGE_LABEL, instruction=self.spec.instruction, labels=self.labels_text(),
                              text=text, label=json.dumps(self.descs[kind], ensure_ascii=False),
                              options=judgement.lettered(self.ANSWERS))

    def judge_questions(self, row_id: str, text: str, asker: str = "label_check") -> list[Question]:
        return [Question(stable_id(asker, row_id, label), self.judge_blank(kind, text), 2, kind)
                for kind, label in enumerate(self.ids)]

    def judged(self, found: Judgement) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        by_row = found.probabilities.reshape(-1, len(self.ids), 2)
        answered = ~np.isnan(by_row).any(axis=(1, 2))
        confidence = np.full(len(by_row), np.nan)
        confidence[answered] = by_row[answered].max(axis=2).min(axis=1)  # the least sure label's
        return np.nan_to_num(by_row[..., 0]) > np.nan_to_num(by_row[..., 1]), answered, confidence

    def label_probabilities(self, found: Judgement) -> np.ndarray:
        return found.probabilities.reshape(-1, len(self.ids), 2)[..., 0]

    def judge_prior(self, found: Judgement) -> dict[str, float]:
        return {label: round(float(p), 4) for label, p in zip(self.ids, found.priors[:, 0])}

    def judge_reason(self, missing: np.ndarray, extra: np.ndarray) -> np.ndarray:
        return np.where(missing.any(axis=1), *self.judge_reasons)

    def verdicts(self, judged: np.ndarray, answered: np.ndarray) -> tuple[str, pa.Array]:
        found = [[self.ids[i] for i in np.flatnonzero(row)] if ok else None for row, ok in zip(judged, answered)]
        return "judged_labels", pa.array(found, pa.list_(pa.string()))

    def judge_figures(self, intended: np.ndarray, judged: np.ndarray, answered: np.ndarray) -> dict:
        found = {}
        for name, mask in (("missing_by_label", intended & ~judged), ("extra_by_label", judged & ~intended)):
            per_label = (mask & answered[:, None]).sum(axis=0)
            found[name] = {label: int(n) for label, n in zip(self.ids, per_label) if n}
        return found

    def targets(self, keys: list[str]) -> np.ndarray:
        return self.members(keys).astype(np.int8)

    def check_targets(self, y: np.ndarray) -> None:
        for label, have in zip(self.ids, y.sum(0)):
            _enough(label, have)
            if have == len(y):
                raise ConfigError(f"train: every training row has label {label!r}, so it has no negatives; "
                                  "lower multi_label.max_labels or raise multi_label.none_share")

    def sampler(self, y: np.ndarray, seed: int):
        return pairs.SetPairSampler(y, seed)

    def head(self, max_iter: int, seed: int):
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier

        return OneVsRestClassifier(LogisticRegression(max_iter=max_iter, random_state=seed))

    def splits(self, test_size: float) -> dict[str, tuple[float, float]]:
        return {"tuning": (0.0, test_size / 2), "held_out": (test_size / 2, test_size)}

    def tune(self, head, tallies: Callable[[str, Callable], Tally | None]) -> np.ndarray | None:
        def counts(keys: list[str], vectors: np.ndarray) -> Tally:
            return metrics.threshold_counts(self.targets(keys), head.predict_proba(vectors))

        found = tallies("tuning", counts)
        none = np.zeros((len(metrics.THRESHOLDS), len(self.ids), 3))  # no tuning rows: every label at 0.5
        return metrics.tuned_thresholds(none if found is None else found)

    def tally(self, head, thresholds: np.ndarray | None, keys: list[str], vectors: np.ndarray) -> Tally:
        return metrics.set_tally(self.targets(keys), head.predict_proba(vectors) >= thresholds)

    def metrics(self, tally: Tally, thresholds: np.ndarray | None) -> dict:
        assert thresholds is not None  # tuned first (``tune``)
        found = metrics.set_metrics(tally, self.ids)
        for label, threshold in zip(self.ids, thresholds):
            found["per_label"][label]["threshold"] = float(threshold)
        return found

    def headline(self, figures: dict) -> dict[str, float]:
        return {key: figures[key] for key in ("micro_f1", "macro_f1", "subset_accuracy")}

    def split_png(self, figures: dict, title: str) -> bytes:
        subtitle = f"{title}\n" + ", ".join(f"{key} {value:.3f}" for key, value in self.headline(figures).items())
        labels = list(figures["per_label"])
        values = np.round([[figures["per_label"][label][key] for key in ("precision", "recall", "f1")]
                           for label in labels], 2)
        names = [self.shown(label) for label in labels]
        return plots.heatmap(values, names, ["precision", "recall", "F1"], "label", "", subtitle)

    def eval_labels(self, values: list, settings: EvalSetSpec) -> list[list[str] | None]:
        """A list column as it is; text split at ``label_separator`` (a blank cell: no labels)."""
        if any(isinstance(value, list) for value in values):
            return [None if value is None else [v for v in value if v is not None] for value in values]
        if settings.label_separator is None:
            raise ConfigError(f"train.eval_set.label_separator: {settings.label_column!r} holds text, not lists; "
                              "give the separator between its labels, such as ','")
        return [None if value is None else [part.strip() for part in value.split(settings.label_separator)
                                            if part.strip()] for value in values]


def _enough(label: str, have: int) -> None:
    """Every label needs 2 training rows, for a head class and a positive pair."""
    if have < 2:
        raise ConfigError(f"train: label {label!r} has {have} training row(s), at least 2 are needed; generate more "
                          "rows or lower train.test_size")


def scheme(spec: JobSpec) -> LabelScheme:
    """The spec's label scheme."""
    return MultiLabel(spec) if spec.multi_label.enabled else SingleLabel(spec)


def predictions(head, labels: list[str], scores: np.ndarray, thresholds: np.ndarray | None,
                missing: np.ndarray) -> dict[str, pa.Array]:
    """What ``predict`` writes for rows with these ``scores`` (null for ``missing`` texts): a
    set model's ``labels`` (those reaching their threshold) and ``scores``; else ``prediction``
    (the best label), its ``score`` and ``scores``."""
    per_label = pa.FixedSizeListArray.from_arrays(pa.array(scores.ravel()), len(labels), mask=pa.array(missing))
    if getattr(head, "multilabel_", False):
        chosen = [None if gone else [label for label, hit in zip(labels, row) if hit]
                  for row, gone in zip(scores >= thresholds, missing)]
        return {"labels": pa.array(chosen, pa.list_(pa.string())), "scores": per_label}
    best = scores.argmax(axis=1)
    return {"prediction": pa.array([labels[i] for i in best], pa.string(), mask=missing),
            "score": pa.array(scores[np.arange(len(best)), best], pa.float32(), mask=missing),
            "scores": per_label}

