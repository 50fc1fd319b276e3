"""Sample record: round trip, strictness, group construction."""

import pytest

from miles_fsdp.data.sample import Sample, Status, load_samples, make_group, save_samples


def _sample():
    return Sample(
        prompt=[{"role": "user", "content": "1+1?"}], group_index=1, index=2, label="2",
        prompt_ids=[1, 2, 3], response="2", response_ids=[7, 8], response_logprobs=[-0.5, -0.25],
        loss_mask=[1, 1], reward=1.0, status=Status.TRUNCATED, weight_version=3, metadata={"src": "x"},
    )


def test_round_trip_through_jsonl(tmp_path):
    s = _sample()
    assert Sample.from_dict(s.to_dict()) == s
    assert s.to_dict()["status"] == "truncated"
    save_samples(tmp_path / "batch.jsonl", [s, Sample(prompt="hi")])
    back = load_samples(tmp_path / "batch.jsonl")
    assert back == [s, Sample(prompt="hi")]


def test_from_dict_is_strict():
    d = _sample().to_dict()
    d["rm_type"] = "math"
    with pytest.raises(ValueError, match=r"unknown keys \['rm_type'\]"):
        Sample.from_dict(d)
    with pytest.raises(ValueError, match="status 'done' is not one of"):
        Sample.from_dict({"prompt": "x", "status": "done"})
    with pytest.raises(ValueError, match="missing required key 'prompt'"):
        Sample.from_dict({})


def test_load_samples_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "oops": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a saved Sample"):
        load_samples(path)


def test_slots_reject_unknown_attributes():
    with pytest.raises(AttributeError):
        _sample().rm_type = "math"


def test_check_lengths():
    s = _sample()
    s.check()
    s.loss_mask.append(0)
    with pytest.raises(ValueError, match="response_ids has 2 tokens but .* loss_mask 3"):
        s.check()


def test_make_group_indices_and_independence():
    g = make_group(Sample(prompt="p", label="4", prompt_ids=[5], metadata={"k": 1}), group_size=3, group_index=2)
    assert [s.index for s in g] == [6, 7, 8] and all(s.group_index == 2 for s in g)
    assert all(s.index // 3 == s.group_index for s in g)
    g[0].prompt_ids.append(9)
    g[0].metadata["k"] = 2
    assert g[1].prompt_ids == [5] and g[1].metadata == {"k": 1}
    assert g[1].status is Status.PENDING and g[1].reward is None
