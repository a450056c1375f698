"""SkipGPT in vLLM, against oracles: our transformers path at the same decisions, vLLM's own
dense model, and the same requests run alone. Runs in `make test-vllm` (its own venv with
vLLM); skipped where vLLM is not installed.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the model's counts are
read directly; the server test runs the real multi-process engine through `skipgpt serve`.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm installs it in its own venv)")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

import skipgpt  # noqa: E402
import skipgpt.vllm as skipgpt_vllm  # noqa: E402
from skipgpt.models import resolve_model_path  # noqa: E402

KV_BYTES = 1 << 26
PROMPTS = [[int(t) for t in torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(n))] for n in (3, 9, 17)]
NEW_TOKENS = 12
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def _tiny(family: str, tok):
    torch.manual_seed(0)
    kw = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=True,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)
    if family == "mistral":
        kw["sliding_window"] = 6  # shorter than the longer prompts, so it matters
    if family == "qwen2":
        kw.update(use_sliding_window=False)
    config = getattr(transformers, FAMILIES[family] + "Config")(**kw)
    model = getattr(transformers, FAMILIES[family] + "ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):  # Qwen2's q/k/v biases
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _export(family: str, tmp_path_factory, threshold: float = 0.5):
    tok = AutoTokenizer.from_pretrained(resolve_model_path(None))
    model = _tiny(family, tok)
    root = tmp_path_factory.mktemp(f"{family}-{threshold}")
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    skipgpt.apply(model, skipgpt.SkipConfig(threshold=threshold))
    torch.manual_seed(3)
    with torch.no_grad():  # routers that skip a fair share of each module's tokens
        for _, r in skipgpt.routers(model):
            r.weight_predictor.weight.normal_(0, 0.3)
            r.weight_predictor.bias.zero_()
            r.input_scale.fill_(1.5)
    return skipgpt.export_model(model, root / "export", tok), root / "base"


def _llm(path) -> LLM:
    return LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=256, enable_prefix_caching=False,
               kv_cache_memory_bytes=KV_BYTES, seed=0)


def _close(llm) -> None:
    del llm
    gc.collect()


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=1, ignore_eos=True)


def _generate(llm, prompts):
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], GREEDY, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tmp_path_factory):
    export, base = _export(request.param, tmp_path_factory)
    llm = _llm(export)
    yield request.param, export, base, llm
    _close(llm)


def test_vllm_equals_the_hf_skipping_path(served):
    """Greedy tokens and their log-probabilities equal our transformers model's at the same
    decisions, and so do the decisions: the realised sparsity over the same tokens is equal."""
    _, export, _, llm = served
    # The fused ops really run: vLLM keeps the plain weights they read (on the CPU it would
    # otherwise repack them for oneDNN and drop them, sending every step to the fallback).
    from skipgpt.vllm.models import _plain_weight

    kept = llm.apply_model(lambda m: [_plain_weight(getattr(getattr(layer, a), b)) is not None for layer in m.model.layers
                                      for a, b in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"),
                                                   ("mlp", "gate_up_proj"), ("mlp", "down_proj"))])[0]
    assert all(kept)
    hf = skipgpt.from_pretrained(export)
    for prompt in PROMPTS:
        skipgpt_vllm.stats(llm, reset=True)
        (tokens, logprobs), = _generate(llm, [prompt])
        vllm_stats = skipgpt_vllm.stats(llm)
        # The HF oracle, teacher-forced on the tokens vLLM ran through the model (the last
        # generated token is never fed back).
        ids = torch.tensor([prompt + tokens[:-1]])
        skipgpt.reset_stats(hf)
        with torch.no_grad():
            lp = torch.log_softmax(hf(ids).logits[0, len(prompt) - 1:].double(), -1)
        ref = lp[torch.arange(len(tokens)), torch.tensor(tokens)]
        assert (lp.max(-1).values - ref).max() < 1e-4, "vLLM's greedy token is not the oracle's argmax"
        torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64), ref, rtol=0, atol=2e-4)
        hf_stats = skipgpt.stats(hf)
        assert vllm_stats["tokens"] == ids.shape[1]
        for key in ("attn_skip", "mlp_skip", "param_sparsity"):
            assert vllm_stats[key] == pytest.approx(hf_stats[key], abs=1e-9), key
        assert 0.1 < vllm_stats["attn_skip"] < 0.9 and 0.1 < vllm_stats["mlp_skip"] < 0.9


def test_a_tokens_decisions_do_not_depend_on_its_batch(served):
    """Requests of different lengths together give the tokens, log-probabilities and per-layer
    decision counts of each request run alone."""
    _, _, _, llm = served
    skipgpt_vllm.stats(llm, reset=True)
    together = _generate(llm, PROMPTS)
    batch_counts = skipgpt_vllm.stats(llm, reset=True)
    alone, counts = [], {"attn_exec_per_layer": 0, "mlp_exec_per_layer": 0}
    for p in PROMPTS:
        alone += _generate(llm, [p])
        s = skipgpt_vllm.stats(llm, reset=True)
        for k in counts:
            counts[k] = torch.tensor(s[k]) + counts[k]
    for (t_b, lp_b), (t_a, lp_a) in zip(together, alone):
        assert t_b == t_a
        torch.testing.assert_close(torch.tensor(lp_b), torch.tensor(lp_a), rtol=0, atol=1e-4)
    for k, v in counts.items():
        assert batch_counts[k] == v.tolist()


def test_prefix_caching_changes_nothing(served):
    """With vLLM's prefix cache on, a request whose prompt is cached (its K and V reused, its
    tokens not run again) gets the tokens and log-probabilities of the uncached run."""
    family, export, _, llm = served
    if family != "llama":
        pytest.skip("one family is enough")
    prompt = PROMPTS[2] * 3  # 51 tokens: more than one 16-token block is cached
    (want_t, want_lp), = _generate(llm, [prompt])
    cached = LLM(model=str(export), dtype="float32", enforce_eager=True, max_model_len=256, enable_prefix_caching=True,
                 kv_cache_memory_bytes=KV_BYTES, seed=0)
    try:
        runs = [_generate(cached, [prompt])[0] for _ in range(2)]
        for tokens, lp in runs:
            assert tokens == want_t
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(want_lp), rtol=0, atol=1e-4)
    finally:
        _close(cached)


def test_execute_all_equals_vllm_dense(tmp_path_factory):
    """Threshold 0 (every token runs every module) gives vLLM's own dense model's tokens and
    log-probabilities, with realised sparsity 0."""
    export, base = _export("llama", tmp_path_factory, threshold=0.0)
    llm = _llm(export)
    skipgpt_vllm.stats(llm, reset=True)
    ours = _generate(llm, PROMPTS)
    assert skipgpt_vllm.stats(llm)["param_sparsity"] == 0.0
    _close(llm)
    llm = _llm(base)
    dense = _generate(llm, PROMPTS)
    _close(llm)
    for (t_o, lp_o), (t_d, lp_d) in zip(ours, dense):
        assert t_o == t_d
        torch.testing.assert_close(torch.tensor(lp_o), torch.tensor(lp_d), rtol=0, atol=1e-4)


def test_compiled_mode_is_refused_with_the_fix(tmp_path_factory):
    export, _ = _export("llama", tmp_path_factory)
    with pytest.raises(Exception, match="enforce_eager=True"):
        LLM(model=str(export), dtype="float32", enforce_eager=False, max_model_len=256, kv_cache_memory_bytes=KV_BYTES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_skipgpt_serve_answers_requests(served, tmp_path):
    """`skipgpt serve` starts vLLM's OpenAI server (engine in its own process, the plugin loaded
    there by its entry point); its greedy completions equal the offline engine's, it logs the
    realised sparsity, and it stops on SIGTERM."""
    family, export, _, llm = served
    if family != "llama":
        pytest.skip("one server start is enough")
    port = _free_port()
    env = {**os.environ, "SKIPGPT_LOG_INTERVAL": "0.01", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "skipgpt.cli", "serve", str(export), "--port", str(port), "--",
         "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory-bytes", str(KV_BYTES)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, open(tmp_path / "server.log").read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(1)
        for prompt in PROMPTS[:2]:
            body = json.dumps({"model": str(export), "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                               "ignore_eos": True, "logprobs": 1}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                answer = json.loads(r.read())
            (want_tokens, want_lp), = _generate(llm, [prompt])
            got_lp = answer["choices"][0]["logprobs"]["token_logprobs"]
            assert len(got_lp) == NEW_TOKENS
            torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp), rtol=0, atol=1e-4)
        time.sleep(0.5)
    finally:
        proc.terminate()
        rc = proc.wait(timeout=60)
    out = open(tmp_path / "server.log").read()
    assert "SkipGPT: " in out and "realised parameter sparsity" in out, out[-3000:]
    assert rc in (0, -15), out[-3000:]


def test_registration_is_idempotent():
    """vLLM calls the plugin in every process, possibly more than once: each call leaves the
    same registrations (the four architectures, the skipgpt_* config types)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    for _ in range(3):
        skipgpt_vllm.register()
    archs = set(ModelRegistry.get_supported_archs())
    assert {"SkipGPTLlamaForCausalLM", "SkipGPTMistralForCausalLM", "SkipGPTQwen2ForCausalLM", "SkipGPTQwen3ForCausalLM"} <= archs
    cfg = AutoConfig.for_model("skipgpt_qwen3", hidden_size=64)
    assert type(cfg).__name__ == "SkipGPTQwen3Config" and cfg.model_type == "skipgpt_qwen3"
