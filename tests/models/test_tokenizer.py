import json

import pytest
from transformers import AutoTokenizer

from miles_fsdp.data.tokenizer import TokenizerError, load_tokenizer
from miles_fsdp.models.testing import write_tiny_tokenizer


def test_chat_template_ids_match_transformers(tmp_path):
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [258, 256]}))
    tok = load_tokenizer(tmp_path)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2? é"}]
    ids = tok.apply_chat_template(msgs)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert ids == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs, add_generation_prompt=False)[-2:] == [258, 10]
    assert tok.tokenize_prompt("hi") == [104, 105] and tok.tokenize_prompt(msgs) == ids
    assert tok.eos_token_ids == (258, 256) and tok.pad_token_id == 256


def test_missing_tokenizer_and_template_are_named(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not a directory"):
        load_tokenizer(tmp_path / "absent")
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    tok = load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
