"""The background writer: one job at a time, a newer snapshot replaces a waiting one of its key, errors
reach the loop at its next check, flush waits for everything; and files written in pieces read back."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from hpcdistill.background import BackgroundWriter
from hpcdistill.checkpoints import h5io, read_h5, write_h5


def test_a_newer_snapshot_replaces_the_waiting_one_and_flush_waits():
    writer = BackgroundWriter()
    gate, done = threading.Event(), []
    writer.submit("exchange", lambda: (gate.wait(10), done.append("e1")))  # runs, blocked on the gate
    time.sleep(0.05)
    writer.submit("exchange", lambda: done.append("e2"))          # waits ...
    writer.submit("checkpoint", lambda: done.append("c1"))
    writer.submit("exchange", lambda: done.append("e3"))          # ... and is replaced by this one
    assert not writer.idle and done == []
    gate.set()
    writer.flush()
    assert done == ["e1", "c1", "e3"] and writer.replaced == 1 and writer.written == 3 and writer.idle
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit("exchange", lambda: None)


def test_an_error_is_raised_once_at_the_next_check():
    writer = BackgroundWriter()

    def fail():
        raise OSError(28, "No space left on device", "/shared/ex/group-0/step-00000050.h5")

    writer.submit("exchange", fail)
    deadline = time.monotonic() + 10
    while not writer.idle and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match="No space left on device"):
        writer.check()
    writer.check()  # reported once
    writer.submit("exchange", lambda: None)
    writer.close()


def test_flush_raises_the_error_of_a_job_it_waited_for():
    writer = BackgroundWriter()
    writer.submit("checkpoint", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.flush()
    writer.close()


def test_large_arrays_are_written_in_pieces_and_read_back_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(h5io, "WRITE_BLOCK", 1000)  # pieces of 3 rows of 320 bytes
    arrays = {"model/w": np.arange(80 * 10, dtype=np.float32).reshape(10, 80),
              "model/row": np.arange(500, dtype=np.float64).reshape(1, 500),
              "model/v": np.arange(700, dtype=np.int64), "model/s": np.float32(3.5)}
    path = write_h5(tmp_path / "step-00000001.h5", arrays, {"step": 1})
    back, meta = read_h5(path)
    assert meta["step"] == 1 and all(np.array_equal(back[k], v) for k, v in arrays.items())
