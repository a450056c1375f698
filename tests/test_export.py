"""The export folder: written from a patched model or a router folder, loaded back into
transformers equal to the model it came from, and never loaded silently as the base model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import FAMILY_NAMES, tiny_model

import skipgpt
from skipgpt.checkpoint import CheckpointError
from skipgpt.export import WEIGHTS_FILE, export, export_model, from_pretrained, read_export_config


def _patched(family: str, threshold: float = 0.5):
    model = tiny_model(family)
    skipgpt.apply(model, skipgpt.SkipConfig(threshold=threshold, mode="native"))
    torch.manual_seed(3)
    with torch.no_grad():  # routers that skip some tokens of each module, not all or none
        for _, r in skipgpt.routers(model):
            r.weight_predictor.weight.normal_(0, 0.3)
            r.weight_predictor.bias.zero_()
            r.input_scale.fill_(2.0)  # exported as it is (vLLM reads it too)
    return model


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_export_loads_back_equal(tmp_path, family):
    model = _patched(family)
    out = export_model(model, tmp_path / "exp")
    cfg = read_export_config(out)
    base_arch = type(model).__name__
    assert cfg["architectures"] == ["SkipGPT" + base_arch]
    assert cfg["model_type"] == "skipgpt_" + model.config.model_type
    assert cfg["skipgpt"]["threshold"] == 0.5 and cfg["skipgpt"]["base_architecture"] == base_arch
    loaded = from_pretrained(out)
    assert skipgpt.is_patched(loaded) and skipgpt.state(loaded).config.threshold == 0.5
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    for mode in ("masked", "native"):
        skipgpt.set_mode(model, mode)
        skipgpt.set_mode(loaded, mode)
        with torch.no_grad():
            want, got = model(ids).logits, loaded(ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        s = skipgpt.stats(loaded)
        assert 0.05 < s["attn_skip"] < 0.95 and 0.05 < s["mlp_skip"] < 0.95  # routing is exercised
    # Execute-all of the loaded model is the plain base model.
    skipgpt.set_threshold(loaded, 0.0)
    skipgpt.remove(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_saved_once(tmp_path):
    from safetensors import safe_open

    model = tiny_model("llama", tie_word_embeddings=True)
    skipgpt.apply(model, skipgpt.SkipConfig(threshold=0.3))
    out = export_model(model, tmp_path / "exp")
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert "model.layers.2.router_mlp.weight_predictor.weight" in keys
    loaded = from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_refusals_change_nothing(tmp_path):
    model = _patched("llama")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_model(model, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]
    with pytest.raises(ValueError, match="no SkipGPT routers"):
        export_model(tiny_model("llama"), tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    # A plain HF folder, or a router folder, is not an export: the error says what to use.
    plain = tmp_path / "hf"
    tiny_model("llama").save_pretrained(plain)
    with pytest.raises(CheckpointError, match="not a SkipGPT export"):
        from_pretrained(plain)
    skipgpt.save_routers(model, tmp_path / "routers")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path / "routers")
    # Routers that do not fit the weights are refused before any model is built.
    out = export_model(model, tmp_path / "exp")
    cfg = json.loads((out / "config.json").read_text())
    cfg["skipgpt"]["num_layers"] = 5
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="5 layers"):
        from_pretrained(out)


def test_plain_transformers_never_loads_it_as_the_base_model(tmp_path):
    """In a fresh process without skipgpt imported, AutoModelForCausalLM refuses the folder; with
    trust_remote_code it loads it through skipgpt, patched, with the saved threshold."""
    out = export_model(_patched("qwen3", threshold=0.4), tmp_path / "exp")
    code = f"""
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(out)!r})
except Exception as e:
    print("refused:", type(e).__name__)
else:
    sys.exit("loaded the export as a plain model")
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
import skipgpt
print("patched:", skipgpt.is_patched(m), skipgpt.state(m).config.threshold)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused:" in r.stdout and "patched: True 0.4" in r.stdout


def test_cli_export_of_the_committed_model_equals_load_skipgpt(tmp_path, smollm2):
    """`skipgpt export` of the shipped 25% folder (routers and, where shipped, their LoRA
    adapter, merged) gives a folder whose model computes what load_skipgpt's does, tokenizer
    included; the merged adapter changes the weights the base model has."""
    from transformers import AutoTokenizer

    from skipgpt import cli
    from skipgpt.demo import committed_routers

    routers = committed_routers(0.25)
    assert cli.main(["export", "--routers", str(routers), "--out", str(tmp_path / "exp")]) == 0
    loaded = from_pretrained(tmp_path / "exp")
    tok = AutoTokenizer.from_pretrained(tmp_path / "exp")
    base, ref_tok = smollm2
    model, _ = skipgpt.load_skipgpt(None, routers)  # a fresh model: merging LoRA changes weights
    ids = ref_tok("The sea is wide and the night is long", return_tensors="pt").input_ids
    assert torch.equal(tok("The sea is wide and the night is long", return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert skipgpt.stats(loaded)["param_sparsity"] == skipgpt.stats(model)["param_sparsity"] > 0.1
    q = "model.layers.0.self_attn.q_proj.weight"
    has_lora = (routers / "adapter_model.safetensors").exists()
    assert torch.equal(loaded.state_dict()[q], base.state_dict()[q]) is not has_lora
    with pytest.raises(FileExistsError):
        export(routers, tmp_path / "exp")


def test_serve_checks_the_folder_before_starting_vllm(tmp_path, capsys):
    """`skipgpt serve` refuses what vLLM could not serve with a reason, before starting it; the
    command it runs is vLLM's OpenAI server in eager mode, with the flags after `--` appended."""
    from skipgpt import cli

    with pytest.raises(SystemExit, match="not a SkipGPT export"):
        cli.main(["serve", str(tmp_path)])
    gemma = tiny_model("gemma2")
    skipgpt.apply(gemma, skipgpt.SkipConfig())
    out = export_model(gemma, tmp_path / "gemma")
    with pytest.raises(SystemExit, match="Gemma2ForCausalLM.*LlamaForCausalLM"):
        cli.main(["serve", str(out)])
    assert from_pretrained(out) is not None  # it still loads in transformers
    llama = export_model(_patched("llama"), tmp_path / "llama")
    try:
        cmd = cli.serve_command(str(llama), "127.0.0.1", 8001, ["--max-model-len", "64"])
    except SystemExit as e:  # vLLM is not installed in this venv
        assert "pip install 'skipgpt[vllm]'" in str(e)
    else:
        assert cmd[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"] and cmd[4] == str(llama)
        assert "--enforce-eager" in cmd and cmd[-2:] == ["--max-model-len", "64"]
    with pytest.raises(SystemExit):
        cli.main(["eval-ppl", "--", "--max-model-len", "64"])
    assert "only `skipgpt serve`" in capsys.readouterr().err
