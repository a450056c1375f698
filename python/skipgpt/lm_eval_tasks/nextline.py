"""``skipgpt_nextline``: an offline multiple-choice task built from the Shakespeare corpus.

Each item shows a few consecutive lines of one paragraph (a speech, or a stanza of a poem) and
asks which of 4 candidate lines comes next: the true next line, or one of 3 distractor lines
drawn from elsewhere in the same document. Distractors are of similar length, so that the
unconditional probability of a short line does not decide the answer, and come from at least
``MIN_DISTANCE`` lines away, so that the context does not give them away.

The items come from the documents of the ``test`` split of :func:`skipgpt.data.split_documents`
(few-shot examples from ``validation``), so a model whose routers were tuned on the ``train``
split never saw them. The construction is deterministic: documents in name order, a fixed seed
per document (string seeds of :class:`random.Random` do not depend on ``PYTHONHASHSEED``), and a
final seeded shuffle so that any prefix (``limit=``) mixes all documents.

lm-eval calls :func:`load_dataset` through the task YAML (``custom_dataset: !function ...``), so
no Hugging Face hub and no ``datasets`` download cache are involved.
"""

from __future__ import annotations

import functools
import json
import random
import re
from typing import Any

import numpy as np

SEED = 1234
CONTEXT_LINES = 4  # at most this many lines before the answer, all from the same paragraph
MIN_CONTEXT_LINES = 2
MIN_WORDS = 4  # candidate and answer lines have at least this many words
MIN_DISTANCE = 12  # distractors come from at least this many lines away from the answer
ITEMS_PER_DOCUMENT = {"test": 100, "validation": 25}
N_CHOICES = 4

_WS = re.compile(r"\s+")


def _is_text_line(line: str) -> bool:
    """A line of verse or prose: enough words, not a stage direction, not an all-caps heading."""
    if line.startswith("[") or line.isupper():
        return False
    return len(line.split()) >= MIN_WORDS


def _paragraphs(text: str) -> list[list[str]]:
    """Blank-line separated paragraphs, each a list of whitespace-normalised lines."""
    paragraphs, current = [], []
    for raw in text.split("\n"):
        line = _WS.sub(" ", raw).strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    return paragraphs


def document_items(name: str, text: str, n_items: int, seed: int = SEED) -> list[dict[str, Any]]:
    """Build up to ``n_items`` next-line items from one document (deterministic)."""
    rng = random.Random(f"{seed}:{name}")
    lines: list[str] = []  # every line of the document, in order
    targets: list[tuple[int, list[str]]] = []  # (line index of the answer, its context lines)
    for para in _paragraphs(text):
        start = len(lines)
        lines.extend(para)
        for j in range(MIN_CONTEXT_LINES, len(para)):
            if _is_text_line(para[j]):
                targets.append((start + j, para[max(0, j - CONTEXT_LINES):j]))
    pool = np.array([i for i, line in enumerate(lines) if _is_text_line(line)], dtype=np.int64)
    pool_len = np.array([len(lines[i]) for i in pool], dtype=np.int64)
    chosen = sorted(rng.sample(range(len(targets)), min(n_items, len(targets))))
    items = []
    for t in chosen:
        index, context = targets[t]
        answer = lines[index]
        far = pool[np.abs(pool - index) >= MIN_DISTANCE]
        similar = pool[(np.abs(pool - index) >= MIN_DISTANCE)
                       & (np.abs(pool_len - len(answer)) <= max(8, 0.25 * len(answer)))]
        candidates = (similar if len(similar) >= 10 * N_CHOICES else far).tolist()
        distractors: list[str] = []
        # A few seeded draws nearly always hold 3 distinct lines; else a full seeded permutation.
        for draw in (min(len(candidates), 2 * N_CHOICES), len(candidates)):
            for i in rng.sample(candidates, draw):
                if lines[i] != answer and lines[i] not in distractors and len(distractors) < N_CHOICES - 1:
                    distractors.append(lines[i])
            if len(distractors) == N_CHOICES - 1:
                break
        if len(distractors) < N_CHOICES - 1:
            continue  # a tiny document: not enough distinct lines
        label = rng.randrange(N_CHOICES)
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append({
            "id": f"{name}:{index}",
            "document": name,
            "context": "\n".join(context),
            "choices": choices,
            "label": label,
        })
    return items


@functools.lru_cache(maxsize=8)
def _cached_items(split: str, seed: int, items_per_document: int | None) -> str:
    return json.dumps(build_items(split, seed, items_per_document, cache=False))


def build_items(
    split: str = "test", seed: int = SEED, items_per_document: int | None = None, *, cache: bool = True
) -> list[dict[str, Any]]:
    """All items of ``split`` (``test`` or ``validation``), in a fixed, seeded order.

    With ``cache`` a process builds each split once (lm-eval rebuilds the dataset on every
    evaluation); the result is always a fresh copy.
    """
    if cache:
        return json.loads(_cached_items(split, seed, items_per_document))
    from skipgpt import data

    if split not in ITEMS_PER_DOCUMENT:
        raise ValueError(f"skipgpt_nextline has splits {sorted(ITEMS_PER_DOCUMENT)}, not {split!r}")
    n = ITEMS_PER_DOCUMENT[split] if items_per_document is None else items_per_document
    docs = data.split_documents(data.corpus_documents("shakespeare"), split)
    items = [item for name in sorted(docs) for item in document_items(name, docs[name], n, seed)]
    random.Random(f"{seed}:{split}:order").shuffle(items)
    return items


def load_dataset(**kwargs: Any):
    """lm-eval ``custom_dataset`` hook: ``{"test": Dataset, "validation": Dataset}``.

    lm-eval passes the task metadata and ``dataset_kwargs`` as keyword arguments; only ``seed``
    is used (the rest, e.g. ``version``, is ignored).
    """
    import datasets  # installed with lm-eval

    seed = int(kwargs.get("seed", SEED))
    return {
        split: datasets.Dataset.from_list(build_items(split, seed), split=split)
        for split in ("test", "validation")
    }
