"""Chat data and chat quality: the model's own answers as tuning data, and a repetition metric.

Routers must be tuned on text like what the model will see. For an instruct model that is its
chat format and modern prose, which no offline corpus here has. :func:`generate_corpus` asks
the dense model to answer a few hundred prompts built from :data:`TEMPLATES` x :data:`TOPICS`
(sampled, temperature 0.7, once) and keeps each exchange in the model's chat template: the
routers then learn on exactly the token distribution the dense model produces, which is also
what distillation matches. Records are split by a hash of the prompt (80/10/10).

:data:`EVAL_PROMPTS` are separate, hand-written prompts in other forms; :func:`chat_eval`
answers them greedily and reports the fraction of repeated 4-grams in each answer (the
"The sea. The sea. ..." failure scores high; fluent text scores near 0).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

TEMPLATES = (
    "Explain {t} to a beginner.",
    "What is {t}?",
    "Give me three tips about {t}.",
    "Write a short paragraph about {t}.",
    "Why does {t} matter?",
    "Describe the history of {t} in a few sentences.",
    "What are the pros and cons of {t}?",
    "Write a short story that involves {t}.",
    "How would you teach a child about {t}?",
    "Summarize the main ideas of {t}.",
    "What are common mistakes people make with {t}?",
    "Write a friendly email to a colleague about {t}.",
    "List some interesting facts about {t}.",
    "Compare {t} with something similar.",
    "What questions should I ask before starting with {t}?",
    "Write a short poem about {t}.",
    "How has {t} changed in the last fifty years?",
    "Give a step-by-step guide to getting started with {t}.",
    "What would the world look like without {t}?",
    "Tell me a fun fact about {t} and explain it.",
)

TOPICS = (
    "photosynthesis", "the water cycle", "volcanoes", "the solar system", "black holes",
    "climate change", "recycling", "gardening", "cooking pasta", "baking bread",
    "healthy sleep", "running", "learning a new language", "saving money", "budgeting",
    "job interviews", "public speaking", "time management", "writing a resume", "teamwork",
    "machine learning", "the internet", "computer programming", "databases", "cybersecurity",
    "smartphones", "electric cars", "solar energy", "wind power", "batteries",
    "the Roman Empire", "the printing press", "ancient Egypt", "the industrial revolution", "democracy",
    "chess", "soccer", "playing the guitar", "painting", "photography",
    "dogs", "cats", "bees", "the ocean", "rainforests",
    "vaccines", "the human heart", "nutrition", "meditation", "friendship",
    "traveling on a budget", "moving to a new city", "renting an apartment", "coffee", "tea",
    "mathematics", "prime numbers", "probability", "statistics", "geometry",
)

# Hand-written evaluation prompts, in forms the training templates do not use.
EVAL_PROMPTS = (
    "Write one sentence about the sea.",
    "Can you suggest a name for a small bakery and say why it fits?",
    "My houseplant has yellow leaves. What might be wrong?",
    "In two sentences, how does a bicycle stay upright?",
    "Draft a polite message declining a meeting invitation.",
    "What should I pack for a weekend hiking trip?",
    "Explain what a recipe is, as if to a five-year-old.",
    "Give me a reason to learn to play an instrument.",
    "What is the difference between weather and climate?",
    "Describe your ideal morning routine.",
)

SYSTEM_PROMPT = None  # the tokenizer's chat template adds its own default system prompt


def prompts(n: int | None = None) -> list[str]:
    """Training prompts (templates x topics): all of them, or ``n`` of them chosen by hash (a
    fixed, well-mixed subset), in a fixed order."""
    every = [tpl.format(t=topic) for topic in TOPICS for tpl in TEMPLATES]
    if n is None:
        return every
    return sorted(every, key=lambda p: hashlib.sha256(p.encode()).hexdigest())[:n]


def split_of(prompt: str) -> str:
    """``train`` / ``validation`` / ``test`` by the SHA-256 of the prompt (80/10/10)."""
    b = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 10
    return "test" if b == 0 else "validation" if b == 1 else "train"


def format_chat(tok, prompt: str, answer: str | None = None) -> str:
    """The exchange as the model sees it: its chat template, with the generation prompt when
    ``answer`` is None."""
    messages = [{"role": "user", "content": prompt}]
    if answer is None:
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    messages.append({"role": "assistant", "content": answer})
    return tok.apply_chat_template(messages, tokenize=False)


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _prompt_ids(tok, texts: Sequence[str]) -> dict:
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        return tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = old


@torch.no_grad()
def generate_corpus(
    model, tok, prompt_list: Sequence[str] | None = None, max_new_tokens: int = 128, batch_size: int = 16,
    temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, progress: bool = True,
    partial: str | os.PathLike | None = None,
) -> list[dict]:
    """The dense model's sampled answers to ``prompt_list`` (default: :func:`prompts`).

    Returns records ``{"prompt", "answer", "split", "text"}``; ``text`` is the whole exchange
    in the chat template. Call it on the unpatched (or execute-all) model. With ``partial``
    (a JSON-lines path), each finished batch is appended there and a rerun continues after
    the last finished batch (batch ``i`` is sampled with seed ``seed + i``, so a resumed run
    gives the records an uninterrupted one would).
    """
    prompt_list = list(prompt_list if prompt_list is not None else prompts())
    device = next(model.parameters()).device
    records = _read_partial(partial) if partial is not None and Path(partial).exists() else []
    starts = range(len(records) // batch_size * batch_size, len(prompt_list), batch_size)
    if partial is not None and Path(partial).exists():  # keep whole batches; drop a torn line
        records = records[: starts.start]
        with open(partial, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    for i in tqdm(starts, desc="Generating chat data", disable=not progress):
        torch.manual_seed(seed + i // batch_size)
        batch = prompt_list[i : i + batch_size]
        enc = _prompt_ids(tok, [format_chat(tok, p) for p in batch])
        out = model.generate(
            input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
            pad_token_id=_pad_id(tok),
        )
        new = []
        for p, row in zip(batch, out[:, enc.input_ids.shape[1] :]):
            answer = tok.decode(row, skip_special_tokens=True).strip()
            new.append({"prompt": p, "answer": answer, "split": split_of(p), "text": format_chat(tok, p, answer)})
        records.extend(new)
        if partial is not None:
            with open(partial, "a", encoding="utf-8") as f:
                for r in new:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return records


def _read_partial(path) -> list[dict]:
    """The records of a partial file; a last line torn by a kill is dropped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


def save_corpus(records: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write records as gzipped JSON lines, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def load_corpus(path: str | os.PathLike, split: str | None = None) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if split is None or r["split"] == split]


def repeated_ngram_fraction(ids: Sequence[int], n: int = 4) -> float:
    """Fraction of the ``n``-grams of ``ids`` that already occurred earlier in ``ids`` (0 for
    text without repeats, close to 1 for a loop)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file, one per line; blank lines and lines starting with ``#`` are
    skipped. A file without prompts is refused."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines()]
    found = [l for l in lines if l and not l.startswith("#")]
    if not found:
        raise ValueError(f"--prompts {path}: no prompts in it (one per line; # starts a comment)")
    return found


@torch.no_grad()
def chat_eval(model, tok, prompt_list: Sequence[str] = EVAL_PROMPTS, max_new_tokens: int = 64,
              batch_size: int | None = None, progress: bool = False) -> dict:
    """Greedy answers to ``prompt_list`` (left-padded batches of ``batch_size``; default: one
    batch) with each answer's repeated 4-gram fraction and their mean."""
    device = next(model.parameters()).device
    prompt_list = list(prompt_list)
    step = batch_size or max(len(prompt_list), 1)
    rows = []
    for start in tqdm(range(0, len(prompt_list), step), desc="Answering", unit="batch", disable=not progress):
        batch = prompt_list[start : start + step]
        enc = _prompt_ids(tok, [format_chat(tok, p) for p in batch])
        out = model.generate(
            input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=_pad_id(tok),
        )
        for p, gen in zip(batch, out[:, enc.input_ids.shape[1] :].tolist()):
            eos = tok.eos_token_id
            ids = gen[: gen.index(eos)] if eos in gen else gen
            rows.append({"prompt": p, "answer": tok.decode(ids, skip_special_tokens=True),
                         "rep4": repeated_ngram_fraction(ids)})
    return {"answers": rows, "rep4": sum(r["rep4"] for r in rows) / max(len(rows), 1)}
