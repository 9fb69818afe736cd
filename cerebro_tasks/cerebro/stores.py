"""Cerebro's stores: ``LocalStore`` and ``HDFSStore``, on top of :class:`cerebro_tasks.storage.store.Store`.

Same layout as Cerebro::

    <prefix>/train_data/     prepared training rows (Parquet, at least one file per worker)
    <prefix>/val_data/       prepared validation rows
    <prefix>/runs/<run_id>/  one model selection: checkpoints, journal, TensorBoard logs (tb/),
                             history.json, summary.json, summary.md, learning_curves.png

``train_path``, ``val_path`` and ``runs_path`` move those folders elsewhere (e.g. onto an existing
Petastorm dataset, for ``fit_on_prepared_data``). Paths come back as full URLs
(``file:///...``, ``hdfs://...``), as Cerebro's did, so Spark, pyarrow and Petastorm all take them.

HDFS goes through pyarrow's ``HadoopFileSystem`` (libhdfs, so ``HADOOP_HOME``/``CLASSPATH`` must be
set as for any pyarrow HDFS use). Every process of a search (driver, Spark workers) opens the store
from its URL, so who it connects as comes from the Hadoop environment of each process
(``HADOOP_USER_NAME``, ``KRB5CCNAME``, ``core-site.xml``); ``user`` and ``kerb_ticket`` given here are
exported to the driver's environment when it does not set them already.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from typing import Any

from cerebro_tasks.storage.store import Store

log = logging.getLogger("cerebro_tasks")

__all__ = ["LocalStore", "HDFSStore", "FilesystemStore"]


class FilesystemStore:
    """What both stores share: the layout, Cerebro's path getters, and :class:`Store` views."""

    FS_PREFIX = ""

    def __init__(self, prefix_path: str, train_path: str | None = None, val_path: str | None = None,
                 test_path: str | None = None, runs_path: str | None = None) -> None:
        self.prefix_path = self.get_full_path(prefix_path)
        self._train_path = self._full_or_default(train_path, "train_data")
        self._val_path = self._full_or_default(val_path, "val_data")
        self._test_path = self._full_or_default(test_path, "test_data")
        self._runs_path = self._full_or_default(runs_path, "runs")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.prefix_path!r})"

    # Cerebro's getters ---------------------------------------------------------------------------------
    def get_train_data_path(self, idx: Any = None) -> str:
        return f"{self._train_path}.{idx}" if idx is not None else self._train_path

    def get_val_data_path(self, idx: Any = None) -> str:
        return f"{self._val_path}.{idx}" if idx is not None else self._val_path

    def get_test_data_path(self, idx: Any = None) -> str:
        return f"{self._test_path}.{idx}" if idx is not None else self._test_path

    def get_runs_path(self) -> str:
        return self._runs_path

    def get_run_path(self, run_id: str) -> str:
        return posixpath.join(self._runs_path, run_id)

    def get_logs_path(self, run_id: str) -> str:
        """Where the TensorBoard logs of a search live (one sub-folder per model)."""
        return posixpath.join(self.get_run_path(run_id), "tb")

    def get_checkpoint_path(self, run_id: str) -> str:
        return posixpath.join(self.get_run_path(run_id), "models")

    def path_prefix(self) -> str:
        return self.FS_PREFIX

    @classmethod
    def matches(cls, path: str) -> bool:
        return path.startswith(cls.FS_PREFIX)

    def get_full_path(self, path: str) -> str:
        return path if self.matches(path) else self.path_prefix() + path

    def get_localized_path(self, path: str) -> str:
        """The path inside the filesystem (the URL without its scheme and host)."""
        return Store(path).root if "://" in path else path

    def get_filesystem(self) -> Any:
        return self.store().fs

    def exists(self, path: str) -> bool:
        return self._store_of(path).exists()

    def read(self, path: str) -> bytes:
        return self._store_of(path).read_bytes()

    def is_parquet_dataset(self, path: str) -> bool:
        from cerebro_tasks.cerebro.data import data_files

        try:
            return bool(data_files(path))
        except (OSError, ValueError):
            return False

    def get_parquet_dataset(self, path: str) -> Any:
        import pyarrow.parquet as pq

        s = self._store_of(path)
        return pq.ParquetDataset(s.root, filesystem=s.fs)

    def saving_runs(self) -> bool:
        return True

    # views for this project's code -------------------------------------------------------------------
    def store(self) -> Store:
        """The prefix folder as a :class:`Store`."""
        return self._store_of(self.prefix_path)

    def runs_store(self) -> Store:
        return self._store_of(self._runs_path)

    def run_store(self, run_id: str) -> Store:
        return self._store_of(self.get_run_path(run_id))

    def _store_of(self, url: str) -> Store:
        return Store(url)

    def _full_or_default(self, path: str | None, default: str) -> str:
        if path is not None:
            return self.get_full_path(path)
        return posixpath.join(self.prefix_path, default)


class LocalStore(FilesystemStore):
    """The local filesystem (or an NFS mount every worker sees) as Cerebro's store.

    :param prefix_path: folder for everything (e.g. ``/user/test/cerebro``); relative paths are made
        absolute, since Spark workers do not share the driver's working directory.
    :param train_path: (optional) training data folder; default ``<prefix_path>/train_data``.
    :param val_path: (optional) validation data folder; default ``<prefix_path>/val_data``.
    :param runs_path: (optional) runs folder; default ``<prefix_path>/runs``.
    """

    FS_PREFIX = "file://"

    def __init__(self, prefix_path: str, train_path: str | None = None, val_path: str | None = None,
                 runs_path: str | None = None) -> None:
        super().__init__(self._absolute(prefix_path), train_path=self._absolute(train_path),
                         val_path=self._absolute(val_path), runs_path=self._absolute(runs_path))

    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        if path is None:
            return None
        if path.startswith(cls.FS_PREFIX):
            return path
        if "://" in path:
            raise ValueError(f"LocalStore takes local paths or file:// URLs, got {path!r}; use HDFSStore for hdfs://")
        return os.path.abspath(os.path.expanduser(path))

    def _store_of(self, url: str) -> Store:
        # plain paths: what the MOP runtime and its tests use for local runs
        return Store(url[len(self.FS_PREFIX):] if url.startswith(self.FS_PREFIX) else url)


class HDFSStore(FilesystemStore):
    """HDFS as Cerebro's store, through pyarrow's ``HadoopFileSystem``; the same layout as LocalStore.

    ``prefix_path`` takes Cerebro's three forms: ``hdfs://namenode01:8020/user/test/cerebro``,
    ``hdfs:///user/test/cerebro`` (the default namenode) and ``/user/test/cerebro``. ``host`` and
    ``port`` override the URL's. Nothing connects until the store is first used.

    :param temp_dir: accepted for compatibility; local temporary files go to ``$TMPDIR``.
    :param driver: only ``'libhdfs'`` (pyarrow's); ``'libhdfs3'`` is gone from pyarrow.
    :param extra_conf: not supported per store (set it in ``hdfs-site.xml``); a non-empty value is an error.
    """

    FS_PREFIX = "hdfs://"
    URL_PATTERN = r"^(?:(.+://))?(?:([^/:]+))?(?:[:]([0-9]+))?(?:(.+))?$"

    def __init__(self, prefix_path: str, train_path: str | None = None, val_path: str | None = None,
                 runs_path: str | None = None, temp_dir: str | None = None, host: str | None = None,
                 port: int | None = None, user: str | None = None, kerb_ticket: str | None = None,
                 driver: str = "libhdfs", extra_conf: dict[str, str] | None = None) -> None:
        if driver != "libhdfs":
            raise ValueError(f"HDFSStore: driver {driver!r} is not available; pyarrow supports only 'libhdfs'")
        if extra_conf:
            raise ValueError("HDFSStore: extra_conf cannot be applied per store (every Spark worker opens the store "
                             "from its URL); put these settings in hdfs-site.xml / core-site.xml instead")
        scheme, url_host, url_port, path = self.parse_url(prefix_path)
        if scheme is not None and scheme != self.FS_PREFIX:
            raise ValueError(f"HDFSStore: mismatched namespace in {prefix_path!r}: found {scheme!r}, expected "
                             f"{self.FS_PREFIX!r}")
        if not path:
            raise ValueError(f"HDFSStore: no path in {prefix_path!r}; expected e.g. hdfs://namenode:8020/user/me/cerebro")
        self.host = host or url_host or "default"
        self.port = int(port or url_port or 0)
        self.user = user
        self.kerb_ticket = kerb_ticket
        self.temp_dir = temp_dir
        # 'default' (fs.defaultFS of core-site.xml) is spelt hdfs:///path, as Spark and Hadoop spell it
        authority = "" if self.host == "default" else self.host + (f":{self.port}" if self.port else "")
        self._url_prefix = f"{self.FS_PREFIX}{authority}"
        for var, value in (("HADOOP_USER_NAME", user), ("KRB5CCNAME", kerb_ticket)):
            if value and not os.environ.get(var):
                os.environ[var] = value
                log.info("HDFSStore: %s=%s for this driver; Spark workers need it in their environment too", var, value)
        super().__init__(self._url_prefix + path, train_path=train_path, val_path=val_path, runs_path=runs_path)

    @classmethod
    def parse_url(cls, url: str) -> tuple[str | None, str | None, int | None, str | None]:
        """(scheme incl. '://', host, port, path) of Cerebro's accepted forms."""
        match = re.search(cls.URL_PATTERN, url)
        if match is None:
            raise ValueError(f"HDFSStore: cannot parse {url!r}")
        scheme, host, port, path = match.group(1), match.group(2), match.group(3), match.group(4)
        return scheme, host, int(port) if port is not None else None, path

    def path_prefix(self) -> str:
        return self._url_prefix

    @classmethod
    def matches(cls, path: str) -> bool:
        return path.startswith(cls.FS_PREFIX)

    def get_full_path(self, path: str) -> str:
        if self.matches(path):
            return path
        if "://" in path:
            raise ValueError(f"HDFSStore: {path!r} is not an hdfs:// URL")
        return self.path_prefix() + (path if path.startswith("/") else "/" + path)
