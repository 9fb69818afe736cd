"""This machine's processes as Linux /proc shows them, for tests that check nothing is left running."""

from __future__ import annotations

import os
from typing import Iterator, NamedTuple


class Proc(NamedTuple):
    pid: int
    ppid: int
    pgid: int
    cmdline: bytes


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after "(command name)": state, ppid, pgid, ...; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def running(pid: int) -> bool:
    """Whether `pid` is a live process. Zombies are dead: their parent (here maybe a PID 1 that does
    not reap) only has not collected them yet."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def live_processes() -> Iterator[Proc]:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is None or fields[0] in ("Z", "X"):
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        yield Proc(int(entry), int(fields[1]), int(fields[2]), cmdline)
