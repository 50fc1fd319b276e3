import json

import pytest

from miles_fsdp.data.datasets import DataConfig, PromptDataset
from miles_fsdp.quickstart.task import TaskConfig, make_splits, write_task

SMALL = dict(num_sft=300, num_rl=100, num_heldout=50)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = write_task(tmp_path / "a", TaskConfig(seed=3, **SMALL))
    b = write_task(tmp_path / "b", TaskConfig(seed=3, **SMALL))
    c = write_task(tmp_path / "c", TaskConfig(seed=4, **SMALL))
    for split in ("sft", "rl", "heldout"):
        assert a[split].read_bytes() == b[split].read_bytes()
    assert a["heldout"].read_bytes() != c["heldout"].read_bytes()


def test_splits_are_disjoint_sized_and_correct():
    cfg = TaskConfig(min_digits=1, max_digits=2, **SMALL)
    splits = make_splits(cfg)
    assert {k: len(v) for k, v in splits.items()} == {"heldout": 50, "rl": 100, "sft": 300}
    sets = [set(v) for v in splits.values()]
    assert sum(map(len, sets)) == len(set().union(*sets)) == 450
    assert all(0 <= x <= 99 for pairs in splits.values() for pair in pairs for x in pair)


def test_heldout_does_not_move_when_sft_grows():
    small = make_splits(TaskConfig(num_sft=10, num_rl=10, num_heldout=20))
    big = make_splits(TaskConfig(num_sft=500, num_rl=10, num_heldout=20))
    assert small["heldout"] == big["heldout"]


def test_files_use_the_user_data_format(tmp_path):
    paths = write_task(tmp_path, TaskConfig(**SMALL))
    row = json.loads(paths["sft"].read_text().splitlines()[0])
    assert set(row) == {"prompt", "response"}
    a, b = row["prompt"].rstrip("=").split("+")
    assert int(row["response"]) == int(a) + int(b)
    # rl.jsonl / heldout.jsonl load with the RL dataset's default keys
    ds = PromptDataset(DataConfig(path=str(paths["heldout"]), shuffle=False), tokenize=lambda p: [ord(c) for c in p])
    s = ds.next_batch(1)[0]
    a, b = s.prompt.rstrip("=").split("+")
    assert len(ds) == 50 and s.label == str(int(a) + int(b))


def test_bad_knobs_say_what_to_change():
    with pytest.raises(ValueError, match="min_digits <= max_digits"):
        TaskConfig(min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="distinct pairs"):
        TaskConfig(max_digits=1, num_sft=200, num_rl=1, num_heldout=1)
    with pytest.raises(ValueError, match="num_rl"):
        TaskConfig(num_rl=0)
