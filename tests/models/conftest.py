import pytest

from miles_fsdp.models.testing import build_tiny_checkpoint


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """ckpt(arch, **overrides) -> dir; each distinct checkpoint is written once per session."""
    cache = {}

    def make(arch="qwen3", **overrides):
        key = (arch, repr(sorted(overrides.items())))
        if key not in cache:
            cache[key] = build_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, seed=len(cache), **overrides)
        return cache[key]

    return make
