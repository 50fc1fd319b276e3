"""generate and eval defaults: the prompt format a checkpoint asks for, repeated --prompt,
eval's max_new_tokens and answer extraction fitted to model and data, flag-named errors,
an empty eval set refused instead of scored 0.0, and "auto" device and dtype."""

import json

import pytest
import tyro

from miles_fsdp.commands.eval import EvalCommandConfig, answer_extract, fit_max_new_tokens
from miles_fsdp.commands.generate import GenerateConfig, main as generate_main
from miles_fsdp.data.sample import Sample
from miles_fsdp.data.tokenizer import TokenizerError, load_tokenizer
from miles_fsdp.models.testing import build_tiny_checkpoint
from miles_fsdp.rl.evaluate import evaluate


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny qwen3 checkpoint: byte-level tokenizer with a chat template, 256-token context."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen3")


def _set_generation_config(path, **fields):
    file = path / "generation_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **fields}))


def _drop_chat_template(path):
    (path / "chat_template.jinja").unlink(missing_ok=True)
    file = path / "tokenizer_config.json"
    file.write_text(json.dumps({k: v for k, v in json.loads(file.read_text()).items() if k != "chat_template"}))


def test_text_prompt_format_follows_the_checkpoint(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "c", "qwen3")
    fmt, why = load_tokenizer(path).text_prompt_format()
    assert fmt == "chat" and "chat template" in why
    _set_generation_config(path, prompt_format="plain")  # what the checkpoint was trained on wins
    tok = load_tokenizer(path)
    assert tok.text_prompt_format() == ("plain", "its generation_config.json records prompt_format='plain'")
    assert tok.encode_text_prompt("rev abc=", "plain") == tok.encode("rev abc=")
    assert tok.encode_text_prompt("hi", "chat") == tok.apply_chat_template([{"role": "user", "content": "hi"}])
    _set_generation_config(path, prompt_format=None)
    _drop_chat_template(path)
    assert load_tokenizer(path).text_prompt_format()[0] == "plain"  # no template, nothing else to follow
    _set_generation_config(path, prompt_format="markdown")
    with pytest.raises(TokenizerError, match="prompt_format='markdown'"):
        load_tokenizer(path)


def test_repeated_prompt_flag_keeps_every_prompt():
    cfg = tyro.cli(GenerateConfig, args=["--model", "m", "--prompt", "rev abcd=", "--prompt", "two words"])
    assert cfg.prompt == ["rev abcd=", "two words"]


def test_generate_runs_every_prompt_in_order_and_says_the_format(ckpt, capsys):
    cfg = GenerateConfig(model=str(ckpt), prompt=["hello", "12+3="], max_new_tokens=4, json=True,
                         prompt_format="plain")
    results = generate_main(cfg)
    out, err = capsys.readouterr()
    assert [json.loads(line)["prompt_index"] for line in out.splitlines()] == [0, 1]
    assert "encoded as plain text" in err and "--prompt-format chat" in err
    tok = load_tokenizer(ckpt)
    by_ids = generate_main(GenerateConfig(model=str(ckpt), max_new_tokens=4, prompt_ids=";".join(
        ",".join(map(str, tok.encode(p))) for p in ["hello", "12+3="])))
    assert [r.token_ids for r in results] == [r.token_ids for r in by_ids]


def test_generate_chat_format_without_template_is_refused(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "c", "qwen3")
    _drop_chat_template(path)
    with pytest.raises(ValueError, match="--prompt-format chat: .* has no chat template"):
        generate_main(GenerateConfig(model=str(path), prompt=["x"], prompt_format="chat"))


@pytest.mark.parametrize("flags, message", [
    (dict(max_prompts=-3), r"--max-prompts -3: must be >= 1, or 0"),
    (dict(n_samples=0), r"--n-samples 0: must be >= 1"),
    (dict(max_new_tokens=-1), r"--max-new-tokens -1"),
    (dict(temperature=-0.5), r"--temperature -0.5"),
    (dict(servers=("gpu1:8000",)), r"--servers: 'gpu1:8000'"),
])
def test_eval_config_names_the_flag(flags, message):
    with pytest.raises(ValueError, match=message):
        EvalCommandConfig(model="m", data="d.jsonl", **flags)


def _samples(*labels: str, prompt_len: int = 10) -> list[Sample]:
    return [Sample(prompt="p", label=label, prompt_ids=[1] * prompt_len) for label in labels]


def test_eval_max_new_tokens_fits_the_context(ckpt, capsys):
    cfg = EvalCommandConfig(model=str(ckpt), data="d.jsonl")  # context 256 (max_position_embeddings)
    assert fit_max_new_tokens(cfg, _samples("a", prompt_len=10)) == 246
    assert "capped to the model's context of 256 tokens" in capsys.readouterr().err
    long_context = EvalCommandConfig(model=str(ckpt), data="d.jsonl")
    long_context.engine.max_model_len = 1024
    assert fit_max_new_tokens(long_context, _samples("a")) == 256
    with pytest.raises(ValueError, match=r"--max-new-tokens 250: .* use --max-new-tokens 246 or less"):
        fit_max_new_tokens(EvalCommandConfig(model=str(ckpt), data="d.jsonl", max_new_tokens=250), _samples("a"))
    with pytest.raises(ValueError, match="leaving no room for a response"):
        fit_max_new_tokens(cfg, _samples("a", prompt_len=256))


def test_eval_answer_extract_suits_the_labels(capsys):
    cfg = EvalCommandConfig(model="m", data="d.jsonl")
    assert answer_extract(cfg, _samples("dcba", "hgf")) == "full"  # the quickstart's words
    assert "--answer-extract full" in capsys.readouterr().err
    assert answer_extract(cfg, _samples("42", "-1,000", "3.5")) == "last_number"  # GSM8K-style answers
    assert answer_extract(cfg, _samples("42", "x = 42")) == "full"
    assert answer_extract(EvalCommandConfig(model="m", data="d.jsonl", answer_extract="boxed"), _samples("1")) == "boxed"


def test_evaluate_refuses_an_empty_eval_set():
    with pytest.raises(ValueError, match="no prompts to evaluate"):
        evaluate(None, None, [], lambda s: 1.0, 1, 0.0, 4, (), 0)


def test_a_trainer_records_the_format_of_its_data(tmp_path):
    from miles_fsdp.data.tokenizer import prompt_format_of, record_prompt_format

    assert prompt_format_of(["rev abc=", "rev cd="]) == "plain"
    assert prompt_format_of([[{"role": "user", "content": "hi"}]]) == "chat"
    assert prompt_format_of(["a", [{"role": "user", "content": "hi"}]]) is None
    path = build_tiny_checkpoint(tmp_path / "c", "qwen3")
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    record_prompt_format(path, "plain")
    assert load_tokenizer(path).text_prompt_format()[0] == "plain"
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == eos  # other keys kept
    record_prompt_format(tmp_path / "c", None)  # mixed data: nothing recorded, nothing changed
    assert load_tokenizer(path).recorded_prompt_format == "plain"


def test_cli_prints_these_errors_as_one_message(ckpt, tmp_path, capsys):
    from miles_fsdp import cli

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "rev abc=", "label": "cba"}) + "\n")
    assert cli.main(["eval", "--model", str(ckpt), "--data", str(data), "--max-new-tokens", "250"]) == 1
    err = capsys.readouterr().err
    assert "miles-fsdp eval: error: --max-new-tokens 250" in err and "Traceback" not in err
    no_template = build_tiny_checkpoint(tmp_path / "c", "qwen3")
    _drop_chat_template(no_template)
    assert cli.main(["generate", "--model", str(no_template), "--prompt", "x", "--prompt-format", "chat"]) == 1
    assert "error: --prompt-format chat" in capsys.readouterr().err


def test_device_and_dtype_auto_and_bad_names():
    """One resolution for generate, eval and serve (serve's is tested in tests/engine/test_server_real.py)."""
    import torch

    from miles_fsdp.device import DeviceError, resolve_device, resolve_dtype

    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16  # the trainer's compute dtype
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    for make, field in ((lambda d: GenerateConfig(model="m", device=d), "GenerateConfig.device"),
                        (lambda d: EvalCommandConfig(model="m", data="d.jsonl", device=d), "--device")):
        with pytest.raises(DeviceError, match=f"{field}='tpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
            make("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(DeviceError, match="--device='cuda': this machine has 0 visible CUDA device"):
            resolve_device("cuda")
