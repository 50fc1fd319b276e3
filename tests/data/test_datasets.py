"""PromptDataset: formats, validation errors with locations, filtering, epochs, resume."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from miles_fsdp.data.datasets import DataConfig, DatasetError, PromptDataset


def tokenize(prompt):
    # one token per word; messages: words of all contents
    text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
    return [len(w) for w in text.split()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"prompt": f"question number {i}", "label": i, "src": f"s{i}"} for i in range(5)]


def make(tmp_path, rows=ROWS, **kw):
    return PromptDataset(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), **kw), tokenize)


def test_jsonl_fields_and_metadata(tmp_path):
    ds = make(tmp_path, metadata_keys=("src",), shuffle=False, prompts_per_batch=2)
    batch = ds.next_batch()
    assert [s.prompt for s in batch] == ["question number 0", "question number 1"]
    assert [s.label for s in batch] == ["0", "1"]  # numbers become strings
    assert batch[1].metadata == {"src": "s1"} and batch[1].prompt_ids == [8, 6, 1]
    assert [s.group_index for s in batch] == [0, 1]


def test_chat_messages_prompt(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi there"}], "answer": "x"}]
    ds = make(tmp_path, rows, prompt_key="messages", label_key="answer")
    (s,) = ds.next_batch()
    assert s.prompt == [{"role": "user", "content": "hi there"}] and s.prompt_ids == [2, 5]


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), path)
    ds = PromptDataset(DataConfig(path=str(path), shuffle=False), tokenize)
    assert [s.label for s in ds.next_batch()] == ["0", "1", "2"]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "label": [1]}, {"prompt": "b", "label": [2]}]), bad)
    with pytest.raises(DatasetError, match=r"bad.parquet row 1: label 'label' must be a string or number"):
        PromptDataset(DataConfig(path=str(bad)), tokenize)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "label": 1}\n{"prompt": "b", "label"\n', r"d.jsonl:2: malformed JSON"),
        ('{"prompt": "a", "label": 1}\n\n{"label": 1}\n', r"d.jsonl:3: missing key 'prompt' \(DataConfig.prompt_key\)"),
        ('{"prompt": 5, "label": 1}\n', r"d.jsonl:1: 'prompt' must be a string or a non-empty list"),
        ('{"prompt": [{"role": "user"}], "label": 1}\n', r"d.jsonl:1: 'prompt' must be a string"),
        ('[1, 2]\n', r"d.jsonl:1: expected a JSON object, got list"),
        ('{"prompt": "a"}\n', r"d.jsonl:1: missing key 'label' \(DataConfig.label_key\)"),
        ("\n\n", r"d.jsonl: the file holds no records"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        PromptDataset(DataConfig(path=str(path)), tokenize)


def test_non_utf8_line_is_named_and_a_bom_is_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"prompt": "a", "label": 1}\n'.encode() + '{"prompt": "caf\u00e9", "label": 1}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"d.jsonl:2: not UTF-8 \(byte 0xe9.*save the file as UTF-8"):
        PromptDataset(DataConfig(path=str(path)), tokenize)
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "caf\u00e9", "label": 1}\n'.encode())
    assert len(PromptDataset(DataConfig(path=str(path)), tokenize)) == 1


def test_a_torn_last_metrics_row_is_dropped_on_resume_and_a_bad_middle_row_named(tmp_path, caplog):
    from miles_fsdp.observe.metrics import MetricsFileError, drop_rows_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "train/lo')
    with caplog.at_level("WARNING"):
        drop_rows_after(path, 1)
    assert path.read_text() == '{"step": 1}\n' and "metrics.jsonl:3: dropped a torn last row" in caplog.text
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl:2: not a JSON row"):
        drop_rows_after(path, 1)


def test_missing_file_and_bad_config(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        PromptDataset(DataConfig(path=str(tmp_path / "nope.jsonl")), tokenize)
    with pytest.raises(ValueError, match="DataConfig.path='x.csv': expected a file ending in .jsonl or .parquet"):
        DataConfig(path="x.csv")
    with pytest.raises(ValueError, match="DataConfig.prompts_per_batch must be >= 1"):
        DataConfig(path="x.jsonl", prompts_per_batch=0)
    with pytest.raises(ValueError, match="DataConfig.path is empty"):
        DataConfig(path="")


def test_missing_metadata_key(tmp_path):
    with pytest.raises(DatasetError, match=r"d.jsonl:1: missing key 'level' \(DataConfig.metadata_keys\)"):
        make(tmp_path, metadata_keys=("level",))


def test_length_filter_is_reported(tmp_path, caplog):
    rows = [{"prompt": "short", "label": 1}, {"prompt": "a much longer prompt here", "label": 2}]
    with caplog.at_level(logging.WARNING):
        ds = make(tmp_path, rows, max_prompt_len=2)
    assert len(ds) == 1 and ds.num_filtered == 1
    assert "dropped 1 of 2 prompts longer than max_prompt_len=2" in caplog.text
    assert "d.jsonl:2 (5 tokens)" in caplog.text
    with pytest.raises(DatasetError, match="all 2 prompts exceed max_prompt_len=1"):
        make(tmp_path, [{"prompt": "two words", "label": 1}] * 2, max_prompt_len=1)


def test_epochs_shuffle_and_batches(tmp_path):
    ds = make(tmp_path, prompts_per_batch=2, num_epochs=2, seed=7)
    assert ds.num_batches == 5
    batches = [[s.label for s in b] for b in ds]
    assert [len(b) for b in batches] == [2, 2, 2, 2, 2]
    flat = sum(batches, [])
    epoch0, epoch1 = flat[:5], flat[5:]
    assert sorted(epoch0) == sorted(epoch1) == ["0", "1", "2", "3", "4"]
    assert epoch0 != epoch1  # a different permutation per epoch (seed + epoch)
    assert ds.exhausted and ds.next_batch() == []
    again = [[s.label for s in b] for b in make(tmp_path, prompts_per_batch=2, num_epochs=2, seed=7)]
    assert again == batches  # seeded


def test_resume_exact_position(tmp_path):
    ds = make(tmp_path, prompts_per_batch=2, num_epochs=3, seed=3)
    for _ in range(3):  # crosses the epoch boundary
        ds.next_batch()
    state = json.loads(json.dumps(ds.state_dict()))
    rest = [[s.label for s in b] for b in ds]
    fresh = make(tmp_path, prompts_per_batch=2, num_epochs=3, seed=3)
    fresh.load_state_dict(state)
    assert [[s.label for s in b] for b in fresh] == rest
    other = make(tmp_path, prompts_per_batch=2, num_epochs=3, seed=4)
    with pytest.raises(ValueError, match="resume with the same data file"):
        other.load_state_dict(state)


def test_custom_batch_size_for_oversampling(tmp_path):
    ds = make(tmp_path, shuffle=False, prompts_per_batch=2)
    assert len(ds.next_batch(3)) == 3 and len(ds.next_batch(3)) == 2 and ds.next_batch(3) == []
