"""The store's lock: a holder only beats and releases its own lock, and releasing never hides
the error that ended the block."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator

import pytest

from cerebro_tasks.storage.store import Store


def test_a_holder_that_was_taken_over_neither_beats_nor_releases_its_successors_lock(tmp_path):
    store = Store(str(tmp_path))
    with store.lock("x.lock", heartbeat_s=0.1):
        first = json.loads(store.read_bytes("x.lock"))
        # this holder stalled; another took the lock over and wrote its own record
        successor = {**first, "pid": first["pid"] + 1, "token": "successor", "beat": time.time()}
        store.write_bytes(json.dumps(successor).encode(), "x.lock")
        time.sleep(0.5)  # several beats of the old holder
        assert json.loads(store.read_bytes("x.lock"))["token"] == "successor"
    assert json.loads(store.read_bytes("x.lock"))["token"] == "successor"  # not deleted either


def test_the_lock_is_released_and_beats_while_held(tmp_path):
    store = Store(str(tmp_path))
    with store.lock("x.lock", heartbeat_s=0.1):
        beat = json.loads(store.read_bytes("x.lock"))["beat"]
        time.sleep(0.35)
        assert json.loads(store.read_bytes("x.lock"))["beat"] > beat
    assert not store.exists("x.lock")


@contextmanager
def read_only(folder: str) -> Iterator[None]:
    """The folder becomes unwritable, for root too (immutable attribute) where possible."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", folder]).returncode != 0:
            pytest.skip("cannot make a folder read-only for root here (chattr)")
        undo = ["chattr", "-i", folder]
    else:
        os.chmod(folder, 0o555)
        undo = ["chmod", "755", folder]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_a_failed_release_never_replaces_the_original_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    store = Store(str(out))
    with ExitStack() as still_read_only:
        with pytest.raises(ValueError, match="the real problem"):
            with store.lock("x.lock"):
                # the output goes read-only mid-run and stays so: the lock cannot be deleted
                still_read_only.enter_context(read_only(str(out)))
                raise ValueError("the real problem")
        assert store.exists("x.lock")  # left behind; its dead owner's lock is taken over next time
