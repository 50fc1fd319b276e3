"""The quickstart task: deterministic, disjoint splits, the noisy demonstrations it promises."""

import json

import pytest

from miles_fsdp.data.datasets import DataConfig, PromptDataset
from miles_fsdp.quickstart.task import TaskConfig, write_task


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_files_and_disjoint_splits(tmp_path):
    cfg = TaskConfig(num_sft=300, num_rl=100, num_heldout=50)
    a = write_task(tmp_path / "a", cfg)
    b = write_task(tmp_path / "b", cfg)
    for name in a:
        assert a[name].read_text() == b[name].read_text()
    words = {name: {r["prompt"] for r in _rows(p)} for name, p in a.items()}
    assert not (words["sft"] & words["rl"]) and not (words["sft"] & words["heldout"]) and not (words["rl"] & words["heldout"])
    assert len(words["heldout"]) == 50


def test_labels_reverse_and_demonstrations_are_noisy(tmp_path):
    cfg = TaskConfig(num_sft=1000, num_rl=10, num_heldout=10, echo_rate=0.4)
    paths = write_task(tmp_path, cfg)
    for r in _rows(paths["heldout"]):
        word = r["prompt"][len("rev "):-1]
        assert r["label"] == word[::-1]
    sft = _rows(paths["sft"])
    echoed = sum(r["response"] == r["prompt"][4:-1] and r["response"] != r["response"][::-1] for r in sft)
    assert 0.3 < echoed / len(sft) < 0.5  # ~echo_rate, palindromes aside
    clean = write_task(tmp_path / "clean", TaskConfig(num_sft=200, num_rl=10, num_heldout=10, echo_rate=0.0))
    assert all(r["response"] == r["prompt"][4:-1][::-1] for r in _rows(clean["sft"]))


def test_files_load_as_user_data(tmp_path):
    paths = write_task(tmp_path, TaskConfig(num_sft=20, num_rl=20, num_heldout=5))
    ds = PromptDataset(DataConfig(path=str(paths["rl"])), lambda text: [ord(c) for c in text])
    batch = ds.next_batch(4)
    assert all(s.label and s.prompt.startswith("rev ") for s in batch)


@pytest.mark.parametrize("bad", [{"min_len": 0}, {"echo_rate": 1.0}, {"num_sft": 10**6}])
def test_bad_knobs_name_the_field(bad):
    with pytest.raises(ValueError, match="TaskConfig"):
        TaskConfig(**bad)
