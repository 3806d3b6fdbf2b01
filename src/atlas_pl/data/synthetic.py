"""Seeded synthetic text-classification tasks organised in groups (pure Python, no Lightning).

Each *group* has one labelling rule and one set of label words; every *task* of a group applies that rule with its
own surface: a seeded subset of the group's keyword/filler vocabulary and its own prompt prefix. Tasks in one group
therefore transfer to each other while groups differ, which is what task-aware federated aggregation needs.
The rules are keyword-driven so that a tiny randomly initialised GPT-2 learns them in a few hundred steps.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["GROUPS", "Example", "SyntheticTask", "make_synthetic_tasks"]


@dataclass(frozen=True)
class Example:
    """One labelled text.

    Attributes:
        text: The input text (without prompt template or answer).
        label: Index into the task's ``label_words``.
    """

    text: str
    label: int


@dataclass
class SyntheticTask:
    """A synthetic classification task (label words and :class:`Example` lists).

    Attributes:
        name: Unique task name, e.g. ``"sentiment_0"``.
        group: Group the task belongs to, e.g. ``"sentiment"``.
        label_words: Verbalizer words (leading space, one word each); index = class label.
        train: Training examples.
        validation: Validation examples.
    """

    name: str
    group: str
    label_words: list[str]
    train: list[Example]
    validation: list[Example]


_FILLER = (
    "the a this that it we they one some today really just then also very quite here there my our your "
    "was is were has had will would could about after before with without from over under again still"
).split()

_LEXICONS: dict[str, list[list[str]]] = {
    "sentiment": [
        "good great excellent wonderful lovely happy amazing pleasant delightful superb fantastic brilliant".split(),
        "bad terrible awful horrible poor sad dreadful nasty boring ugly miserable disappointing".split(),
    ],
    "topic": [
        "football tennis goal match team coach player stadium league score basketball referee".split(),
        "atom physics experiment theory molecule laboratory research telescope chemistry biology gene data".split(),
        "election senate vote minister parliament policy president campaign law government party mayor".split(),
        "pizza bread cheese recipe soup pasta dinner kitchen chef salad butter sugar".split(),
    ],
    "language": [
        "house water friend morning city book night river green small window garden".split(),
        "casa agua amigo mañana ciudad libro noche río verde pequeño ventana jardín".split(),
        "maison eau ami matin ville livre nuit rivière vert petit fenêtre jardin".split(),
    ],
    "format": [
        list("0123456789"),
        list("abcdefghjkmnpqrstuvwxyz"),
        "apple river stone cloud paper music window silver forest candle engine mirror".split(),
    ],
    "question": [
        "what why how when where who which whose".split(),
        "the my our their his her this that".split(),
    ],
    "magnitude": [
        [str(i) for i in range(1, 40)],
        [str(i) for i in range(60, 100)],
    ],
}

_LABEL_WORDS: dict[str, list[str]] = {
    "sentiment": [" positive", " negative"],
    "topic": [" sports", " science", " politics", " food"],
    "language": [" English", " Spanish", " French"],
    "format": [" digits", " letters", " words"],
    "question": [" question", " statement"],
    "magnitude": [" low", " high"],
}

_PREFIXES: dict[str, list[str]] = {
    "sentiment": ["", "Review: ", "Opinion: ", "Comment: ", "Feedback: "],
    "topic": ["", "Headline: ", "Article: ", "News: ", "Story: "],
    "language": ["", "Phrase: ", "Words: ", "Snippet: ", "Text: "],
    "format": ["", "Sequence: ", "Tokens: ", "Items: ", "Series: "],
    "question": ["", "Utterance: ", "Line: ", "Said: ", "Speaker: "],
    "magnitude": ["", "Values: ", "Numbers: ", "Readings: ", "Data: "],
}

GROUPS: tuple[str, ...] = ("sentiment", "topic", "language", "format", "question", "magnitude")
"""Available groups, in the order ``make_synthetic_tasks`` uses them."""


@dataclass(frozen=True)
class _Surface:
    """Task-specific surface: keyword subsets per class, filler subset, prefix, separator and length range."""

    keywords: list[list[str]]
    filler: list[str]
    prefix: str
    sep: str
    min_len: int
    max_len: int


def _subset(rng: random.Random, words: list[str], frac: float = 0.7, minimum: int = 4) -> list[str]:
    k = max(min(minimum, len(words)), round(frac * len(words)))
    return sorted(rng.sample(words, k))


def _make_surface(group: str, rng: random.Random) -> _Surface:
    keywords = [_subset(rng, words) for words in _LEXICONS[group]]
    filler = _subset(rng, _FILLER, frac=0.5, minimum=8)
    prefix = rng.choice(_PREFIXES[group])
    sep = rng.choice([", ", " ", " ; "]) if group in ("format", "magnitude") else " "
    min_len = rng.randint(5, 7)
    return _Surface(keywords, filler, prefix, sep, min_len, min_len + rng.randint(3, 5))


def _mix(rng: random.Random, surface: _Surface, label: int, n_key: int, n_other: int) -> list[str]:
    """Builds a word list with ``n_key`` class keywords, ``n_other`` distractors from other classes, rest filler."""
    length = max(rng.randint(surface.min_len, surface.max_len), n_key + n_other)
    words = [rng.choice(surface.keywords[label]) for _ in range(n_key)]
    others = [c for c in range(len(surface.keywords)) if c != label]
    words += [rng.choice(surface.keywords[rng.choice(others)]) for _ in range(n_other)]
    words += [rng.choice(surface.filler) for _ in range(length - len(words))]
    rng.shuffle(words)
    return words


def _gen_sentiment(rng: random.Random, s: _Surface, label: int) -> str:
    n_key = rng.randint(2, 4)
    return " ".join(_mix(rng, s, label, n_key, rng.randint(0, n_key - 2)))


def _gen_topic(rng: random.Random, s: _Surface, label: int) -> str:
    return " ".join(_mix(rng, s, label, rng.randint(3, 4), 0))


def _gen_language(rng: random.Random, s: _Surface, label: int) -> str:
    n = rng.randint(s.min_len - 2, s.max_len - 3)
    return " ".join(rng.choice(s.keywords[label]) for _ in range(n))


def _gen_format(rng: random.Random, s: _Surface, label: int) -> str:
    n = rng.randint(s.min_len - 1, s.max_len - 2)
    return s.sep.join(rng.choice(s.keywords[label]) for _ in range(n))


def _gen_question(rng: random.Random, s: _Surface, label: int) -> str:
    body = [rng.choice(s.filler) for _ in range(rng.randint(s.min_len - 2, s.max_len - 2))]
    first = rng.choice(s.keywords[label])
    return " ".join([first.capitalize(), *body]) + ("?" if label == 0 else ".")


def _gen_magnitude(rng: random.Random, s: _Surface, label: int) -> str:
    n = rng.randint(3, 6)
    return s.sep.join(rng.choice(s.keywords[label]) for _ in range(n))


_GENERATORS: dict[str, Callable[[random.Random, _Surface, int], str]] = {
    "sentiment": _gen_sentiment,
    "topic": _gen_topic,
    "language": _gen_language,
    "format": _gen_format,
    "question": _gen_question,
    "magnitude": _gen_magnitude,
}


def _validate(num_groups: int, tasks_per_group: int, examples_per_task: int, val_fraction: float) -> None:
    if not 1 <= num_groups <= len(GROUPS):
        raise ValueError(f"num_groups={num_groups!r} is out of range; fix: choose 1 <= num_groups <= {len(GROUPS)}.")
    if tasks_per_group < 1:
        raise ValueError(f"tasks_per_group={tasks_per_group!r} must be >= 1; fix: pass tasks_per_group >= 1.")
    if examples_per_task < 10:
        raise ValueError(f"examples_per_task={examples_per_task!r} must be >= 10; fix: pass examples_per_task >= 10.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in (0, 1); fix: pass e.g. val_fraction=0.2.")


def make_synthetic_tasks(
    num_groups: int = 3,
    tasks_per_group: int = 3,
    examples_per_task: int = 200,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> list[SyntheticTask]:
    """Generates grouped synthetic classification tasks deterministically from ``seed``.

    Groups, in order: ``sentiment`` (dominant polarity keywords), ``topic`` (domain keywords), ``language``
    (English/Spanish/French word lists), ``format`` (digits/letters/words sequences), ``question`` (wh-word + ``?``
    vs determiner + ``.``) and ``magnitude`` (all numbers low vs high). Labels are balanced (cycled, then shuffled).

    Args:
        num_groups: Number of groups to use (first ``num_groups`` of :data:`GROUPS`), in ``[1, 6]``.
        tasks_per_group: Tasks per group (>= 1); they share rule and label words but differ in surface.
        examples_per_task: Examples per task before the train/validation split (>= 10).
        val_fraction: Fraction of each task's examples held out for validation, in ``(0, 1)``.
        seed: Seed; the output depends only on the arguments (local RNGs, never the global one).

    Returns:
        ``num_groups * tasks_per_group`` tasks, grouped in order (``sentiment_0, sentiment_1, ..., topic_0, ...``).

    Raises:
        ValueError: If an argument is out of range (the message names it and gives a fix).
    """
    _validate(num_groups, tasks_per_group, examples_per_task, val_fraction)
    n_val = min(max(1, round(val_fraction * examples_per_task)), examples_per_task - 1)
    tasks: list[SyntheticTask] = []
    for g_idx, group in enumerate(GROUPS[:num_groups]):
        n_classes = len(_LABEL_WORDS[group])
        for t_idx in range(tasks_per_group):
            rng = random.Random(f"{seed}:{g_idx}:{t_idx}")
            surface = _make_surface(group, rng)
            labels = [i % n_classes for i in range(examples_per_task)]
            rng.shuffle(labels)
            examples = [Example(surface.prefix + _GENERATORS[group](rng, surface, y), y) for y in labels]
            tasks.append(
                SyntheticTask(
                    name=f"{group}_{t_idx}",
                    group=group,
                    label_words=list(_LABEL_WORDS[group]),
                    train=examples[n_val:],
                    validation=examples[:n_val],
                )
            )
    return tasks
