import json

import torch

from miles_fsdp.data.tokenizer import load_tokenizer
from miles_fsdp.models import ModelArgs, Transformer, load_hf, packed_inputs
from miles_fsdp.quickstart.model import TinyModelConfig, vocab_size, write_tiny_model
from miles_fsdp.quickstart.tokenizer import CHARS, save_char_tokenizer, vocab

TINY = TinyModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_position_embeddings=64)


def test_tokenizer_round_trip_through_transformers(tmp_path):
    from transformers import AutoTokenizer

    save_char_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "12+345=357\nabc XYZ (7*8)"
    ids = hf.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert hf.decode(ids) == text
    assert hf.encode(CHARS, add_special_tokens=False) == list(range(4, 4 + len(CHARS)))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf.decode([7, 2], skip_special_tokens=True) == "3"


def test_tokenizer_loads_in_our_loader_with_chat_template(tmp_path):
    save_char_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_ids == (2,)
    assert tok.tokenize_prompt("1+2=") == tok.encode("1+2=")
    text = tok.apply_chat_template([{"role": "user", "content": "1+2="}], tokenize=False)
    assert text == "user: 1+2=\nassistant: "


def test_checkpoint_loads_in_transformers_and_ours_with_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_tiny_model(tmp_path, TINY)
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == vocab()["<|eos|>"]
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert hf.config.vocab_size == vocab_size() >= len(vocab())
    with torch.device("meta"):
        ours = Transformer(ModelArgs.from_hf(path))
    load_hf(ours, path)
    ids = load_tokenizer(path).encode("47+385=")
    ids_T = torch.tensor(ids)
    pos_T, meta, slot_T = packed_inputs(torch.tensor([0, len(ids)], dtype=torch.int32))
    with torch.no_grad():
        ours_TV = ours.logits(ours(ids_T, pos_T, meta, slot_T))
        hf_TV = hf(ids_T[None]).logits[0]
    torch.testing.assert_close(ours_TV, hf_TV, atol=1e-4, rtol=1e-4)


def test_same_seed_same_weights(tmp_path):
    a = write_tiny_model(tmp_path / "a", TINY)
    b = write_tiny_model(tmp_path / "b", TINY)
    c = write_tiny_model(tmp_path / "c", TinyModelConfig(**{**TINY.__dict__, "seed": 1}))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
