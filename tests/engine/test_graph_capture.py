"""miles_fsdp.graph_capture on CPU: torch.cuda.graph and the generators stood in for by fakes (the
GPU tests capture for real: tests/gpu/test_engine_gpu.py)."""

import contextlib
import gc

import pytest
import torch

from miles_fsdp import graph_capture


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
