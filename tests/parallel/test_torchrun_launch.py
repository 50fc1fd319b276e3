"""tests/torchrun.py: a rank killed by a signal is launched once more (unless retry=False), with a
warning that carries the first attempt's per-rank logs; a Python error fails at once, with each
rank's log."""

from pathlib import Path

import pytest
from torchrun import torchrun

WORKER = Path(__file__).parent / "flaky_worker.py"


def test_a_rank_killed_by_a_signal_is_launched_once_more_with_a_warning(tmp_path):
    marker, cleared = tmp_path / "aborted", []
    with pytest.warns(UserWarning, match=r"(?s)killed by signal 6.*rank 0 stderr.log.*rank 0 aborting"):
        torchrun([WORKER, marker, "abort"], timeout=120, before_retry=lambda: cleared.append(marker.exists()))
    assert (tmp_path / "aborted.launches").read_text().count("launch") == 2
    assert cleared == [True]  # before_retry ran once, between the launches


def test_without_retry_a_killed_rank_fails_at_once(tmp_path):
    marker = tmp_path / "aborted"
    with pytest.raises(AssertionError, match=r"(?s)exited 1.*rank 0 aborting"):
        torchrun([WORKER, marker, "abort"], timeout=120, retry=False)
    assert (tmp_path / "aborted.launches").read_text().count("launch") == 1


def test_a_python_error_fails_at_once_with_each_ranks_log(tmp_path):
    marker = tmp_path / "raised"
    with pytest.raises(AssertionError, match=r"(?s)rank 0 stderr.log.*RuntimeError: a Python error in rank 0"):
        torchrun([WORKER, marker, "raise"], timeout=120)
    assert (tmp_path / "raised.launches").read_text().count("launch") == 1
