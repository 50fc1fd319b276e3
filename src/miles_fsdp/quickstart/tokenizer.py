"""A character-level tokenizer for the quickstart, saved as an HF tokenizer directory.

One token per character (digits, operators, punctuation, space, newline, letters) plus
the specials <|pad|> <|bos|> <|eos|> <|unk|>. Built with the `tokenizers` library and
saved by transformers, so `AutoTokenizer.from_pretrained(dir)` and
`miles_fsdp.data.tokenizer.load_tokenizer(dir)` read it like any real checkpoint's.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
CHARS = string.digits + "+-*/=()<>[]{}.,:;!?'\"#$%&_^|~@ \n" + string.ascii_lowercase + string.ascii_uppercase

# Plain-text prompts ("12+34=") skip the template; chat-message prompts get this one.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def vocab() -> dict[str, int]:
    """Token -> id: specials first (pad = 0), then CHARS in order."""
    return {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *CHARS])}


def build_char_tokenizer():
    """A transformers PreTrainedTokenizerFast over `vocab()`."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    # BPE with no merges splits a string into its characters; Fuse joins them back on decode
    # (the default decoder would put spaces between tokens).
    tok = Tokenizer(models.BPE(vocab=vocab(), merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_char_tokenizer(path: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json (and chat template) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_char_tokenizer().save_pretrained(str(path))
    return path
