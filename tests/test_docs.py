"""The docs stay true: the README's usage example runs on a tiny model, and every relative link in
README.md, BENCHMARKS.md and docs/ points at a file (and heading) that exists."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import skipgpt
from skipgpt import SkipConfig
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _section_code(text: str, heading: str) -> str:
    """The first fenced python block under the given second-level heading."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def test_readme_is_short():
    assert len((ROOT / "README.md").read_bytes()) <= 10 * 1024


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = FENCE.sub("", doc.read_text())
    links = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    assert links or doc.name == "BENCHMARKS.md" or doc.parent.name == "docs", "no links found: the parser is broken"
    for target in links:
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{doc.name}: {target} -> {dest} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{doc.name}: no heading for #{anchor} in {dest.name}"


def test_slug_matches_github():
    assert _slug("Stage 2: LoRA recovery (SkipGPT-RT-L)") == "stage-2-lora-recovery-skipgpt-rt-l"
    assert _slug("Zero-shot: the offline `skipgpt_nextline` task") == "zero-shot-the-offline-skipgpt_nextline-task"


def test_readme_usage_example_runs(smollm2, tmp_path, monkeypatch):
    """The "30-second usage" block, run as written on a tiny Llama (SmolLM2's tokenizer) with
    routers saved beside it; only its ``path = ...`` line is pointed at the tiny model."""
    code = _section_code((ROOT / "README.md").read_text(), "30-second usage")
    path_line = re.compile(r'^path = "[^"]*"(.*)$', re.M)
    assert len(path_line.findall(code)) == 1
    _, tok = smollm2
    folder = tmp_path / "tiny"
    model = tiny_model("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    skipgpt.apply(model, SkipConfig())  # fresh routers: about half the modules skip
    skipgpt.save_routers(model, tmp_path / "routers")
    monkeypatch.chdir(tmp_path)

    printed = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(path_line.sub(f"path = {str(folder)!r}", code), scope)

    assert scope["out"].shape == (1, scope["batch"]["input_ids"].shape[1] + 32)
    sparsity = float(printed.getvalue().split()[-1])
    assert 0.1 < sparsity < 0.9  # the loaded routers really skip
    # "the original model, bit for bit": the unpatched model equals a fresh load.
    assert not skipgpt.is_patched(scope["model"])
    fresh = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ids = scope["batch"]["input_ids"]
    with torch.no_grad():
        assert torch.equal(scope["model"](input_ids=ids).logits, fresh(input_ids=ids).logits)
