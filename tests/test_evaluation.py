"""skipgpt.evaluation.evaluate_lm (lm-evaluation-harness) and the offline skipgpt_nextline task."""

from __future__ import annotations

import pytest
import torch

import skipgpt
from skipgpt import data
from skipgpt.evaluation import SAMPLES_KEY, SPARSITY_KEY, evaluate_lm, local_task_names
from skipgpt.lm_eval_tasks import LOCAL_TASKS
from skipgpt.lm_eval_tasks.nextline import N_CHOICES, build_items
from tiny_models import tiny_model

TASK = "skipgpt_nextline"
TINY_LIMIT = 20


@pytest.fixture(scope="module")
def tiny(smollm2):
    """A 2-layer random Llama with SmolLM2's vocabulary (lm-eval needs a real tokenizer), patched
    with routers calibrated to ~30% skipping on corpus text, so skipping really happens."""
    _, tok = smollm2
    model = tiny_model("llama", vocab_size=len(tok), num_hidden_layers=2, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    skipgpt.apply(model, skipgpt.SkipConfig())
    calib = data.pack_tokens(data.load_texts("shakespeare", "validation"), tok, 64, max_blocks=8, progress=False)
    skipgpt.calibrate_bias(model, calib, 0.3)
    return model, tok


@pytest.fixture(scope="module")
def tiny_results(tiny):
    model, tok = tiny
    results = evaluate_lm(model, tok, [TASK], limit=TINY_LIMIT, batch_size=8, log_samples=True)
    return results, results.pop(SAMPLES_KEY)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def test_task_items_are_deterministic_and_come_from_the_test_split():
    items = build_items("test", cache=False)
    assert items == build_items("test", cache=False)
    assert 300 <= len(items) <= 500
    test_docs = data.split_documents(data.corpus_documents("shakespeare"), "test")
    flat = {name: _normalise(text) for name, text in test_docs.items()}
    assert {it["document"] for it in items} == set(test_docs)
    for it in items:
        choices, label = it["choices"], it["label"]
        assert len(choices) == N_CHOICES == len(set(choices)) and 0 <= label < N_CHOICES
        # The answer is the line that really follows the context in the document.
        assert _normalise(it["context"] + " " + choices[label]) in flat[it["document"]], it["id"]
    # The first items of the (shuffled) order mix documents, so `limit=` samples all of them.
    assert len({it["document"] for it in items[:TINY_LIMIT]}) >= 3
    few_shot_docs = {it["document"] for it in build_items("validation")}
    assert few_shot_docs and not few_shot_docs & set(test_docs)


def test_local_tasks_are_found():
    assert set(LOCAL_TASKS) <= set(local_task_names())


def test_patched_tiny_model_end_to_end(tiny_results):
    tiny_results, _ = tiny_results
    metrics = tiny_results[TASK]
    for name in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert name in metrics and 0.0 <= metrics[name] <= 1.0, (name, metrics)
    sparsity = tiny_results[SPARSITY_KEY]
    assert sparsity["tokens"] > TINY_LIMIT * N_CHOICES * 10
    # Calibrated on other text of the same corpus: close to, not exactly, the 30% target.
    assert 0.15 < sparsity["module_sparsity"] < 0.45 and 0.15 < sparsity["param_sparsity"] < 0.45


def test_deterministic_and_padding_free_statistics(tiny, tiny_results):
    model, tok = tiny
    tiny_results, _ = tiny_results
    assert evaluate_lm(model, tok, [TASK], limit=TINY_LIMIT, batch_size=8) == tiny_results
    # batch_size=1 has no padding at all: the same tokens must be counted, with the same gates.
    unpadded = evaluate_lm(model, tok, [TASK], limit=TINY_LIMIT, batch_size=1)
    assert unpadded[SPARSITY_KEY]["tokens"] == tiny_results[SPARSITY_KEY]["tokens"]
    for key in ("attn_skip", "mlp_skip", "module_sparsity", "param_sparsity"):
        assert unpadded[SPARSITY_KEY][key] == pytest.approx(tiny_results[SPARSITY_KEY][key], abs=2e-3)
    assert unpadded[TASK]["acc"] == tiny_results[TASK]["acc"]


@torch.no_grad()
def test_accuracy_equals_direct_scoring(tiny, tiny_results):
    """Oracle: score the choices with the model directly, as lm-eval defines it (the sum of the
    continuation's token log-probabilities, where context and context+continuation are encoded
    separately and the continuation is the tail), and compare every item's log-likelihoods and
    the accuracies."""
    model, tok = tiny
    tiny_results, samples = tiny_results
    samples = samples[TASK]
    assert [x["doc_id"] for x in samples] == list(range(TINY_LIMIT))
    correct = correct_norm = 0
    for it, sample in zip(build_items("test")[:TINY_LIMIT], samples):
        context = tok.encode(it["context"])
        wholes = [tok.encode(it["context"] + "\n" + choice) for choice in it["choices"]]
        # The 4 choices in one right-padded batch; the mask keeps padding out of the skip gates.
        width = max(map(len, wholes)) - 1
        ids = torch.tensor([w[:-1] + [0] * (width - len(w) + 1) for w in wholes])
        mask = torch.tensor([[1] * (len(w) - 1) + [0] * (width - len(w) + 1) for w in wholes])
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        scores = [
            sum(float(logprobs[row, len(context) - 1 + i, t]) for i, t in enumerate(w[len(context):]))
            for row, w in enumerate(wholes)
        ]
        assert sample["target"] == it["label"]
        assert sample["loglikelihoods"] == pytest.approx(scores, rel=1e-4, abs=1e-3), it["id"]
        correct += max(range(N_CHOICES), key=scores.__getitem__) == it["label"]
        normed = [score / len(choice) for score, choice in zip(scores, it["choices"])]
        correct_norm += max(range(N_CHOICES), key=normed.__getitem__) == it["label"]
    assert tiny_results[TASK]["acc"] == pytest.approx(correct / TINY_LIMIT)
    assert tiny_results[TASK]["acc_norm"] == pytest.approx(correct_norm / TINY_LIMIT)


_LOCAL_KINDS = """
task: {name}
dataset_path: ""
dataset_name: ""
custom_dataset: !function skipgpt.lm_eval_tasks.nextline.load_dataset
test_split: test
{body}
metadata:
  version: 1.0
"""
ROLLING = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: context
metric_list:
  - metric: word_perplexity
"""
GENERATE = """output_type: generate_until
doc_to_text: context
doc_to_target: "{{choices[label]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@torch.no_grad()
def test_log_samples_of_rolling_and_generation_tasks(tiny, tmp_path):
    """log_samples on the other two lm-eval request types, against oracles: a rolling task's
    per-document log-likelihood is the float64 sum over the document's tokens after lm-eval's
    prefix token (short documents: one window), and a generation task's response is the greedy
    continuation up to the first newline."""
    model, tok = tiny
    for name, body in (("tiny_rolling", ROLLING), ("tiny_generate", GENERATE)):
        (tmp_path / f"{name}.yaml").write_text(_LOCAL_KINDS.format(name=name, body=body))
    res = evaluate_lm(model, tok, ["tiny_rolling", "tiny_generate"], limit=3, batch_size=2, include_path=tmp_path,
                      log_samples=True)
    items = build_items("test")[:3]
    rolling, generated = res[SAMPLES_KEY]["tiny_rolling"], res[SAMPLES_KEY]["tiny_generate"]
    assert [x["doc_id"] for x in rolling] == [x["doc_id"] for x in generated] == [0, 1, 2]
    for it, r, g in zip(items, rolling, generated):
        ids = [tok.bos_token_id] + tok.encode(it["context"])  # HFLM's prefix token: BOS, else EOS
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
        want = float(lp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
        assert len(r["loglikelihoods"]) == 1 and r["loglikelihoods"][0] == pytest.approx(want, rel=1e-4)
        ctx = tok.encode(it["context"])
        out = model.generate(input_ids=torch.tensor([ctx]), attention_mask=torch.ones(1, len(ctx), dtype=torch.long),
                             max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, len(ctx):]).split("\n")[0]
        assert g["responses"] == [text] and g["target"] == it["choices"][it["label"]]
    assert res["tiny_rolling"]["word_perplexity"] > 1


def test_sample_records_of_every_response_shape():
    """The shapes lm-eval's filters leave in ``filtered_resps``, kept as plain values."""
    from skipgpt.evaluation import _sample_record

    base = {"doc_id": 4, "target": 1}
    mc = _sample_record({**base, "filter": "none", "filtered_resps": [(-1.5, False), (-0.25, True)]})
    assert mc == {**base, "filter": "none", "loglikelihoods": [-1.5, -0.25], "is_greedy": [False, True]}
    rolling = _sample_record({**base, "filtered_resps": [-812.0]})
    assert rolling == {**base, "filter": "none", "loglikelihoods": [-812.0]}
    text = _sample_record({**base, "filter": "strict-match", "filtered_resps": ["42"]})
    assert text == {**base, "filter": "strict-match", "responses": ["42"]}
    several = _sample_record({**base, "filter": "create_test", "filtered_resps": [["def f(): pass", "def g(): pass"]]})
    assert several["responses"] == [["def f(): pass", "def g(): pass"]]


def test_clear_errors(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_lm(model, tok, [TASK], batch_size="auto")
    with pytest.raises(ValueError, match="non-empty"):
        evaluate_lm(model, tok, [])
    with pytest.raises(FileNotFoundError, match="include_path"):
        evaluate_lm(model, tok, [TASK], include_path="/nonexistent/tasks")


@pytest.mark.slow
def test_smollm2_beats_chance(smollm2):
    """The task is learnable: the real model picks the true next line well above chance (25%)."""
    model, tok = smollm2
    results = evaluate_lm(model, tok, [TASK], limit=40, batch_size=8)
    assert SPARSITY_KEY not in results  # not patched: no sparsity entry
    acc = results[TASK]
    assert acc["acc"] >= 0.35 and acc["acc_norm"] >= 0.35, acc
