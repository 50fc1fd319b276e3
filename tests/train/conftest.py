import json
import sys
from pathlib import Path

import pytest

# tests import the stand-in model and helpers as plain modules
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Qwen3 HF checkpoint (with tokenizer), one per test module."""
    from miles_fsdp.models.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "qwen3")


@pytest.fixture()
def data(tmp_path, request):
    """The test module's ROWS as an sft.jsonl file."""
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in request.module.ROWS) + "\n")
    return path
