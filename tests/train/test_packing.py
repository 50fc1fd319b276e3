"""pack: sequences into micro-batches, token-aligned; targets, mask and fields shifted one token
left inside each sequence (its last token has no target); bad input named."""

import pytest
import torch

from miles_fsdp.train.packing import TrainSeq, pack


def test_collate_shifts_inside_each_sequence():
    seqs = [TrainSeq([5, 6, 7], [0, 1, 1], {"adv": [0.1, 0.2, 0.3]}),
            TrainSeq([8, 9], None, {"adv": [1.0, 2.0]}),
            TrainSeq([1, 2, 3, 4], [1, 0, 1, 1], {"adv": [4.0, 5.0, 6.0, 7.0]})]
    a, b = pack(seqs, 6)  # first-fit decreasing: seq 2 (4 tokens), seq 0 (3) opens a bin, seq 1 (2) joins seq 2
    assert a.seq_index == [1, 2] and b.seq_index == [0]
    assert a.ids_T.tolist() == [8, 9, 1, 2, 3, 4] and a.ids_T.dtype == torch.int64
    assert a.pos_T.tolist() == [0, 1, 0, 1, 2, 3] and a.cu_seqlens.tolist() == [0, 2, 6]
    assert a.cu_seqlens.dtype == torch.int32
    assert a.targets_T.tolist() == [9, 0, 2, 3, 4, 0]
    assert a.mask_T.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0] and a.mask_T.dtype == torch.float32
    assert a.fields["adv"].tolist() == pytest.approx([2.0, 0.0, 5.0, 6.0, 7.0, 0.0])
    assert b.targets_T.tolist() == [6, 7, 0] and b.mask_T.tolist() == [1.0, 1.0, 0.0]
    assert b.fields["adv"].tolist() == pytest.approx([0.2, 0.3, 0.0]) and b.num_tokens == 3


def test_bad_sequences_are_named():
    with pytest.raises(ValueError, match="sequence 1 has 1 token"):
        pack([TrainSeq([1, 2]), TrainSeq([3])], 8)
    with pytest.raises(ValueError, match="sequence 0: loss_mask has 2 entries for 3 tokens"):
        pack([TrainSeq([1, 2, 3], [1, 1])], 8)
    with pytest.raises(ValueError, match="sequence 0 has 9 tokens, more than max_tokens_per_micro_batch=8"):
        pack([TrainSeq(list(range(9)))], 8)
    with pytest.raises(ValueError, match="field 'adv' has 1 entries for 2 tokens"):
        pack([TrainSeq([1, 2], None, {"adv": [0.5]})], 8)
