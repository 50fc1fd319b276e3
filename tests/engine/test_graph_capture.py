"""miles_fsdp.graph_capture on CPU: torch.cuda.graph and the generators stood in for by fakes (the
GPU tests capture for real: tests/gpu/test_engine_gpu.py)."""

import contextlib
import gc

import pytest
import torch

from miles_fsdp import graph_capture

from conftest import graph_layout  # tests/engine/conftest.py: imported at collection, as the other engine tests do


class FakeGraph:
    resets = 0

    def reset(self):
        self.resets += 1


class FakeGenerator:
    def __init__(self):
        self.states = []

    def clone_state(self):
        return "copy"

    def graphsafe_set_state(self, state):
        self.states.append(state)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda.graph records whether the collector ran inside it; one fake generator."""
    seen = {}

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        seen["collecting"], seen["pool"] = gc.isenabled(), pool
        yield

    gen = FakeGenerator()
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "default_generators", (gen,))
    return seen, gen


@pytest.mark.parametrize("collecting", [True, False])
def test_collector_off_inside_and_as_before_after(fake_cuda, collecting):
    seen, gen = fake_cuda
    was = gc.isenabled()
    (gc.enable if collecting else gc.disable)()
    try:
        g = FakeGraph()
        with graph_capture.capture_graph(g, pool=(1, 2)):
            assert not gc.isenabled()
        assert seen == {"collecting": False, "pool": (1, 2)}
        assert gc.isenabled() is collecting and g.resets == 0 and gen.states == []
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("old_torch", [True, False])
def test_failed_capture_resets_graph_and_generator(fake_cuda, monkeypatch, old_torch):
    seen, gen = fake_cuda
    monkeypatch.setattr(graph_capture, "_CAPTURE_FLAG_TORCH", old_torch)
    was = gc.isenabled()
    gc.enable()
    try:
        g = FakeGraph()
        with pytest.raises(RuntimeError, match="capture invalidated"):
            with graph_capture.capture_graph(g):
                raise RuntimeError("capture invalidated")
        assert g.resets == 1 and gc.isenabled()
        assert gen.states == (["copy"] if old_torch else [])
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("k", [0, 2])
def test_dropped_engine_frees_its_caches_without_the_collector(tmp_path, k):
    """The decode graphs' forward is a function of the model, not the runner's bound method: a
    dropped engine's runner, KV cache and graph buffers go at once (the cycle runner <-> graphs kept
    them for the collector, which on a GPU could run inside another engine's capture)."""
    import weakref

    from miles_fsdp.engine import Engine, EngineConfig, Request, SamplingParams
    from miles_fsdp.models import load_model
    from miles_fsdp.models.testing import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "qwen3", "qwen3", seed=1, tokenizer=False, max_position_embeddings=512)
    model = load_model(path, torch.float32, "cpu", n_mtp=1 if k else 0).eval()
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        eng = graph_layout(Engine(model, config=EngineConfig(page_size=16, num_pages=64, num_speculative_tokens=k),
                                  eos_token_ids=[]))
        eng.generate([Request([1, 2, 3], SamplingParams(max_new_tokens=6))])
        gone = [weakref.ref(o) for o in (eng.runner, eng.runner.graphs, eng.runner.kv_caches[0][0])]
        if k:
            gone.append(weakref.ref(eng.runner.draft_graphs))
        del eng
        assert [r() is None for r in gone] == [True] * len(gone)
    finally:
        (gc.enable if was else gc.disable)()


def test_a_failing_cleanup_is_logged_and_the_capture_error_raised(fake_cuda, monkeypatch, caplog):
    seen, gen = fake_cuda
    monkeypatch.setattr(graph_capture, "_CAPTURE_FLAG_TORCH", True)

    class BrokenReset(FakeGraph):
        def reset(self):
            raise RuntimeError("reset failed")

    with pytest.raises(RuntimeError, match="capture invalidated"):
        with graph_capture.capture_graph(BrokenReset()):
            raise RuntimeError("capture invalidated")
    assert "cleaning up after a failed CUDA graph capture raised RuntimeError: reset failed" in caplog.text


def test_every_capture_of_the_framework_goes_through_capture_graph():
    """A new capture site written with torch.cuda.graph directly would lose both guards."""
    from pathlib import Path

    src = Path(graph_capture.__file__).parent
    direct = [str(p.relative_to(src)) for p in src.rglob("*.py")
              if "torch.cuda.graph(" in p.read_text() and p.name != "graph_capture.py"]
    assert direct == [], f"use miles_fsdp.graph_capture.capture_graph in {direct}"
