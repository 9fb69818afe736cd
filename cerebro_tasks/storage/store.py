"""Where things live: local folders or any pyarrow filesystem URL (file://, hdfs://), with atomic publish.

Every writer in the project goes through `Store` so that nothing half-written is ever visible: a file
is written under a temporary name in the same folder and then renamed into place (atomic on POSIX
filesystems; on HDFS, which does not rename over an existing file, Arrow removes the old file first).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import posixpath
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow.fs as pafs


def _split_url(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it; a plain path means the local filesystem."""
    if "://" not in url:
        return pafs.LocalFileSystem(), os.path.abspath(url)
    fs, path = pafs.FileSystem.from_uri(url)
    return fs, path


class Store:
    """A folder tree on some filesystem, addressed by relative POSIX paths."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = _split_url(url)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __reduce__(self):  # pyarrow filesystems pickle, but the URL alone rebuilds everything
        return (Store, (self.url,))

    # paths ---------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path of a relative location (what pyarrow and, when local, os take)."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def url_of(self, *parts: str) -> str:
        """A URL for the location that Spark, Petastorm and pyarrow all accept."""
        if self.is_local:
            return pathlib.PurePosixPath(self.path(*parts)).as_uri()  # percent-encoded: spaces, '#', '%'...
        base = self.url.rstrip("/")
        return "/".join([base, *parts]) if parts else base

    def sub(self, *parts: str) -> "Store":
        return Store(self.url_of(*parts) if not self.is_local else self.path(*parts))

    # queries -------------------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def listdir(self, *parts: str) -> list[str]:
        """Names in a folder (empty when the folder does not exist), sorted."""
        sel = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel))

    # reading -------------------------------------------------------------------------------------
    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    # writing (always atomic) ---------------------------------------------------------------------
    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole file atomically: a temporary sibling, then a rename."""
        final = self.path(*parts)
        self.fs.create_dir(posixpath.dirname(final), recursive=True)
        tmp = posixpath.join(posixpath.dirname(final), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(final)}")
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, final)
        except BaseException:
            if self.fs.get_file_info(tmp).type == pafs.FileType.File:
                self.fs.delete_file(tmp)  # leave nothing behind but what was there before
            raise

    def write_json(self, obj: Any, *parts: str) -> None:
        """Strict JSON: NaN and infinities (a metric a model never reached) are written as null."""
        text = json.dumps(_finite(obj), indent=1, sort_keys=True, default=_json_default, allow_nan=False)
        self.write_bytes(text.encode(), *parts)

    def put_file(self, local_path: str, *parts: str) -> None:
        """Copy a local file into the store atomically."""
        final = self.path(*parts)
        if self.is_local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(final))
            os.close(fd)
            shutil.copyfile(local_path, tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; published files get the usual mode
            os.replace(tmp, final)
            return
        with open(local_path, "rb") as f:
            self.write_bytes(f.read(), *parts)

    def put_tree(self, local_dir: str, *parts: str) -> None:
        """Publish a local folder as `parts`: copied beside it in full, then renamed into place.

        Readers never see a partial copy. Replacing an existing folder takes two renames (old
        away, new in), so for that instant the path is missing; readers that must never miss it
        should go through a pointer file (see export's LATEST).
        """
        final = self.path(*parts)
        parent = posixpath.dirname(final)
        self.fs.create_dir(parent, recursive=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(final)}")
        self.fs.create_dir(tmp, recursive=True)  # copy_files does not create it for a flat folder
        pafs.copy_files(local_dir, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        self.swap_in(tmp, *parts)

    def swap_in(self, staged_path: str, *parts: str) -> None:
        """Make the complete folder at `staged_path` (a sibling, same filesystem) the folder `parts`."""
        final = self.path(*parts).rstrip("/")
        if self.fs.get_file_info(final).type == pafs.FileType.NotFound:
            self.fs.create_dir(posixpath.dirname(final), recursive=True)
            self.fs.move(staged_path, final)
            return
        old = posixpath.join(posixpath.dirname(final), f".old-{uuid.uuid4().hex[:12]}-{posixpath.basename(final)}")
        self.fs.move(final, old)
        self.fs.move(staged_path, final)
        try:
            self.fs.delete_dir(old)
        except OSError:  # a hidden leftover is harmless; the new folder is in place
            pass

    def move(self, src: tuple[str, ...], dst: tuple[str, ...]) -> None:
        """Rename file ``src`` to ``dst`` in the store, replacing ``dst``: one rename where the
        filesystem replaces atomically (POSIX), else the old ``dst`` is removed first (HDFS)."""
        final = self.path(*dst)
        if not self.is_local and self.fs.get_file_info(final).type == pafs.FileType.File:
            self.fs.delete_file(final)
        self.fs.move(self.path(*src), final)

    @contextmanager
    def local_copy(self, *parts: str) -> Iterator[str]:
        """A local path holding the file's content (the file itself when the store is local)."""
        if self.is_local:
            yield self.path(*parts)
            return
        with tempfile.TemporaryDirectory() as d:
            local = os.path.join(d, posixpath.basename(self.path(*parts)))
            with open(local, "wb") as f:
                f.write(self.read_bytes(*parts))
            yield local

    @contextmanager
    def lock(self, *parts: str, wait_s: float = 0.0, poll_s: float = 2.0,
             heartbeat_s: float | None = None) -> Iterator[None]:
        """Hold an exclusive lock file for the duration of the block.

        Exclusive creation is atomic on local and NFS folders (O_EXCL); elsewhere it is a check
        then a write, which only narrows the race. A lock is taken over when its owner is gone:
        the owner's process has died (same host), or, with `heartbeat_s`, its owner stopped
        refreshing it for three heartbeats (any host: a driver killed on another machine). A live
        lock is waited for up to `wait_s` seconds, then LockedError names its owner.

        The record carries a token of this holder: before each beat and before releasing, the
        holder checks the lock is still its own, so a holder that was taken over (it stalled for
        three heartbeats) neither overwrites nor deletes its successor's lock. Releasing never
        replaces the error that ends the block: a failed release is logged, the original raised.
        """
        import logging
        import socket
        import threading

        token = uuid.uuid4().hex

        def owner_record() -> bytes:
            return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "beat": time.time(),
                               "heartbeat_s": heartbeat_s, "token": token,
                               "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()

        def still_mine() -> bool:
            return self._lock_owner(*parts).get("token") == token

        path = self.path(*parts)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._create_exclusive(path, owner_record())
                break
            except FileExistsError:
                held = self._lock_owner(*parts)
                if _lock_abandoned(held, socket.gethostname()):
                    self.delete(*parts)
                    continue
                if time.monotonic() >= deadline:
                    raise LockedError(f"{self.url_of(*parts)} is held by {held}; another run is using this "
                                      "location. Retry when it is done, or delete the lock file if no run is") from None
                time.sleep(poll_s)
        log = logging.getLogger("cerebro_tasks.storage")
        stop = threading.Event()
        if heartbeat_s:
            def beat() -> None:
                while not stop.wait(heartbeat_s):
                    try:
                        if not still_mine():
                            log.error("%s was taken over by %s: this holder stalled for three heartbeats",
                                      self.url_of(*parts), self._lock_owner(*parts))
                            return
                        self.write_bytes(owner_record(), *parts)
                    except OSError:  # a missed beat is retried at the next one
                        pass

            threading.Thread(target=beat, name=f"lock-heartbeat-{parts[-1]}", daemon=True).start()

        def release() -> None:
            stop.set()
            if still_mine():
                self.delete(*parts)

        try:
            yield
        except BaseException:
            try:
                release()
            except OSError as e:  # e.g. the output went read-only: the caller needs the first error
                log.warning("could not release %s: %s", self.url_of(*parts), e)
            raise
        release()

    def _create_exclusive(self, path: str, data: bytes) -> None:
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise FileExistsError(path)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def _lock_owner(self, *parts: str) -> dict[str, Any]:
        try:
            return json.loads(self.read_bytes(*parts) or b"{}")
        except (OSError, ValueError):
            return {}

    def delete(self, *parts: str) -> None:
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(*parts))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(*parts))


class LockedError(RuntimeError):
    """Another process holds the lock."""


def _lock_abandoned(held: dict[str, Any], host: str) -> bool:
    if held.get("host") == host and not _pid_alive(int(held.get("pid", -1))):
        return True  # its owner died without releasing it
    beat, every = held.get("beat"), held.get("heartbeat_s")
    return bool(beat and every and time.time() - float(beat) > 3 * float(every))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _finite(obj.tolist())
    return obj


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays appear in metrics; JSON wants plain numbers
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
