"""serving/encoder_activity.py: the record through which the llm engine sees the vision encoder's forwards,
across real processes (a child claims a slot and flags a forward; this process reads it)."""
from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np
import pytest

from internvl_serve.serving.encoder_activity import (DEVICE, ENDED_NS, FORWARDS, PID, SINCE_NS, SLOTS, STALE_NS,
                                                     EncoderActivity, create_record, device_number)


def _encoder(path, device, started, finish, exit_mid_forward):
    slot = EncoderActivity(path).claim(device)
    with slot.running():
        started.set()
        finish.wait()
        if exit_mid_forward:
            os._exit(0)  # dies in the middle of the forward: the flag stays set
    slot.release()


def _start_encoder(path, device, exit_mid_forward=False):
    ctx = multiprocessing.get_context("spawn")
    started, finish = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_encoder, args=(str(path), device, started, finish, exit_mid_forward))
    child.start()
    started.wait()
    return child, finish


def test_another_process_forward_is_seen_on_its_device_only(tmp_path):
    record = EncoderActivity(create_record(tmp_path / "activity"))
    assert not record.busy([0])
    child, finish = _start_encoder(record.path, device=0)
    assert record.busy([0]) and record.busy([1, 0])
    assert not record.busy([1]) and not record.busy([-1])
    taken = record.slots[record.slots[:, PID] == child.pid]
    assert len(taken) == 1 and taken[0, DEVICE] == 0 and taken[0, SINCE_NS] > 0
    finish.set()
    child.join()
    assert child.exitcode == 0
    assert not record.busy([0])
    assert not (record.slots[:, PID] == child.pid).any()  # released on the way out


def test_a_dead_encoder_slot_is_reused_and_its_stale_flag_ignored(tmp_path):
    record = EncoderActivity(create_record(tmp_path / "activity"))
    child, finish = _start_encoder(record.path, device=0, exit_mid_forward=True)
    finish.set()
    child.join()
    dead = int(np.flatnonzero(record.slots[:, PID] == child.pid)[0])
    assert record.busy([0])  # flagged until it is stale
    record.slots[dead, SINCE_NS] = time.monotonic_ns() - STALE_NS - 1
    assert not record.busy([0])
    mine = record.claim(device_number("cpu"))
    assert mine.index == dead and record.slots[dead, PID] == os.getpid() and record.slots[dead, DEVICE] == -1


def test_forwards_are_counted_and_a_raising_forward_clears_its_flag(tmp_path):
    record = EncoderActivity(create_record(tmp_path / "activity"))
    slot = record.claim(3)
    with slot.running():
        assert record.busy([3])
    with pytest.raises(RuntimeError), slot.running():
        raise RuntimeError("the forward failed")
    assert not record.busy([3]) and slot.forwards == 2 == record.slots[slot.index, FORWARDS]


def test_a_forward_lingers_as_busy_for_a_reader_that_asks(tmp_path):
    # with linger_ns the encoder counts as busy that long after its last forward ended (the gap before the
    # next image of a queue), on its own device only; a released slot's end does not count
    record = EncoderActivity(create_record(tmp_path / "activity"))
    slot = record.claim(0)
    before = time.monotonic_ns()
    with slot.running():
        pass
    ended = int(record.slots[slot.index, ENDED_NS])
    assert before <= ended <= time.monotonic_ns() and record.slots[slot.index, SINCE_NS] == 0
    assert not record.busy([0])  # no linger asked: idle at once
    hour = 3600 * 10**9
    assert record.busy([0], linger_ns=hour) and not record.busy([1], linger_ns=hour)
    record.slots[slot.index, ENDED_NS] = time.monotonic_ns() - 2 * 10**6  # ended 2 ms ago
    assert not record.busy([0], linger_ns=10**6) and record.busy([0], linger_ns=hour)
    slot.release()
    assert not record.busy([0], linger_ns=hour)


def test_every_slot_taken_is_an_error_and_a_wrong_file_is_refused(tmp_path):
    record = EncoderActivity(create_record(tmp_path / "activity"))
    record.slots[:, PID] = os.getppid()  # alive, and not this process
    with pytest.raises(RuntimeError, match=f"all {SLOTS} encoder slots are taken"):
        record.claim(0)
    (tmp_path / "other").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="not an encoder-activity record"):
        EncoderActivity(tmp_path / "other")


def test_from_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("INTERNVL_ENCODER_ACTIVITY", raising=False)
    assert EncoderActivity.from_environment() is None
    monkeypatch.setenv("INTERNVL_ENCODER_ACTIVITY", str(create_record(tmp_path / "activity")))
    assert EncoderActivity.from_environment().path == tmp_path / "activity"
    told = []
    monkeypatch.setenv("INTERNVL_ENCODER_ACTIVITY", str(tmp_path / "gone"))  # a model runs on without it
    assert EncoderActivity.from_environment(told.append) is None
    assert len(told) == 1 and "gone" in told[0] and "running without it" in told[0]
    assert (device_number("cuda"), device_number("cuda:2"), device_number("cpu")) == (0, 2, -1)
