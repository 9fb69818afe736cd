"""Cerebro's ``SparkBackend``: the Spark application that prepares data and runs MOP.

Same constructor as Cerebro's. Differences in how it works (not in what users type):

* Workers are the MOP runtime's (:mod:`cerebro_tasks.mop.runtime`): one barrier stage of
  ``num_workers`` long-lived tasks per search, started by ``fit``/``fit_on_prepared_data`` and ended
  when the search ends, so ``initialize_workers``/``teardown_workers`` have nothing left to do. Each
  worker reads its share of the prepared Parquet once, into memory; ``disk_cache_size_gb``,
  ``data_readers_pool_type``, ``num_data_readers`` and ``nics`` are accepted and unused.
* ``prepare_data`` splits with a seed, by a hash of each row's content: the same rows give the same
  split whatever the DataFrame's partitioning (Cerebro's split was unseeded).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

log = logging.getLogger("cerebro_tasks")

__all__ = ["SparkBackend", "DEFAULT_SEED"]

DEFAULT_SEED = 2020  # Cerebro's constants.RANDOM_SEED


class SparkBackend:
    """Spark backend running Cerebro's model hopper parallelism.

    :param spark_context: the SparkContext (default: the active one).
    :param num_workers: MOP workers = data partitions (default: ``spark.default.parallelism``). The
        cluster must have this many free task slots at once (a barrier stage).
    :param start_timeout: seconds to wait for every worker to start.
    :param verbose: 0 quiet, 1 progress, 2 more.
    :param schedule: ``"lockstep"`` (same seed, same schedule and weights, see mop/lockstep.py) or
        ``"adaptive"`` (follows real unit durations: never waits, not reproducible).
    """

    def __init__(self, spark_context: Any = None, num_workers: int | None = None, start_timeout: float = 600,
                 disk_cache_size_gb: float = 10, data_readers_pool_type: str = "thread", num_data_readers: int = 10,
                 nics: Sequence[str] | None = None, verbose: int = 1, schedule: str = "lockstep") -> None:
        if spark_context is None:
            import pyspark

            spark_context = pyspark.SparkContext._active_spark_context
            if spark_context is None:
                raise RuntimeError("SparkBackend: no active SparkContext; create a SparkSession first "
                                   "(e.g. cerebro_tasks.spark_session.get_spark()) or pass spark_context=")
        self.spark_context = spark_context
        _use_driver_python(spark_context)
        inferred = num_workers is None
        if inferred:
            num_workers = int(spark_context.defaultParallelism)
        if int(num_workers) < 1:
            raise ValueError(f"SparkBackend: num_workers must be >= 1, got {num_workers!r}")
        self.num_workers = int(num_workers)
        self.start_timeout = float(start_timeout)
        self.disk_cache_size_gb = disk_cache_size_gb
        self.data_readers_pool_type = data_readers_pool_type
        self.num_data_readers = num_data_readers
        self.nics = nics
        self.verbose = int(verbose)
        self.schedule = schedule
        slots = int(spark_context.defaultParallelism)
        if self.num_workers > slots:
            log.warning("SparkBackend: %d workers but spark.default.parallelism is %d; the MOP barrier stage needs "
                        "%d task slots at once and waits for them (start_timeout=%ss)", self.num_workers, slots,
                        self.num_workers, self.start_timeout)
        log.info("SparkBackend: %d workers%s", self.num_workers,
                 " (inferred from spark.default.parallelism)" if inferred else "")

    def __repr__(self) -> str:
        return f"SparkBackend(num_workers={self.num_workers})"

    # Cerebro's interface -----------------------------------------------------------------------------
    def _num_workers(self) -> int:
        return self.num_workers

    @property
    def spark(self) -> Any:
        """The SparkSession of this backend's context."""
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        if active is not None and active.sparkContext is self.spark_context:
            return active
        return SparkSession(self.spark_context)

    def initialize_workers(self) -> None:
        """Nothing to do: each search starts its MOP workers itself and ends them when it ends."""

    def initialize_data_loaders(self, store: Any, schema_fields: Sequence[str] | None = None) -> None:
        """Nothing to do: each MOP worker reads its share of the prepared data when it starts."""

    def teardown_workers(self) -> None:
        """Nothing to do: the workers of a search end with it."""

    def prepare_data(self, store: Any, dataset: Any, validation: float | str | None = 0.25,
                     num_partitions: int | None = None, parquet_row_group_size_mb: float = 8,
                     dataset_idx: Any = None, *, seed: int = DEFAULT_SEED,
                     feature_columns: Sequence[str] | None = None, label_columns: Sequence[str] | None = None,
                     feature_column: str | None = None, label_column: str | None = None,
                     ) -> tuple[int, int, dict[str, Any], float]:
        """Write ``dataset`` into the store as Parquet: ``train_data`` and ``val_data``.

        :param validation: a fraction of rows for validation (seeded, content-hashed split), the name
            of a column whose true / non-zero rows are validation rows (the column is not written), or
            0 / None for no validation data.
        :param num_partitions: files per split (default: the DataFrame's partitions); at least
            ``num_workers`` and a multiple of it, so that every worker gets an equal share.
        :param parquet_row_group_size_mb: Parquet row group size.
        :param seed: seeds the split (keyword; Cerebro had none).
        :param feature_columns: with ``label_columns``, write only these columns (what a search
            reads); default: every column. ``feature_column``/``label_column`` are Cerebro's old
            single-column spellings.
        :returns: Cerebro's tuple ``(train_rows, val_rows, metadata, avg_row_size_bytes)``.

        Spark ML vector columns become float32 arrays (Parquet cannot hold vectors portably).
        """
        from pyspark.ml.functions import vector_to_array
        from pyspark.ml.linalg import VectorUDT
        from pyspark.sql import functions as F

        if feature_column is not None and feature_columns is None:
            feature_columns = [feature_column]
        if label_column is not None and label_columns is None:
            label_columns = [label_column]
        df = dataset
        val_col = validation if isinstance(validation, str) else None
        if val_col is not None and val_col not in df.columns:
            raise ValueError(f"prepare_data: validation column {val_col!r} is not in the DataFrame; columns: {df.columns}")
        if val_col is None and validation is not None and not isinstance(validation, (int, float)):
            raise TypeError(f"prepare_data: validation must be a fraction in [0, 1) or a column name, got {validation!r}")
        fraction = 0.0 if val_col is not None or validation is None else float(validation)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"prepare_data: validation fraction must be in [0, 1), got {validation!r}")
        if feature_columns is not None or label_columns is not None:
            keep = list(dict.fromkeys([*(feature_columns or []), *(label_columns or [])]))
            missing = [c for c in keep if c not in df.columns]
            if missing:
                raise ValueError(f"prepare_data: column(s) {missing} not in the DataFrame; columns: {df.columns}")
            df = df.select(*keep, *([val_col] if val_col and val_col not in keep else []))
        for field in df.schema.fields:
            if isinstance(field.dataType, VectorUDT):
                df = df.withColumn(field.name, vector_to_array(F.col(field.name), "float32"))

        if val_col is not None:
            is_val = F.coalesce(F.col(val_col).cast("boolean"), F.lit(False))
            data_cols = [c for c in df.columns if c != val_col]
        elif fraction > 0:
            # a hash of the row's content, not rand(): the split does not depend on partitioning
            data_cols = list(df.columns)
            h = F.xxhash64(*[F.col(c) for c in data_cols], F.lit(int(seed)))
            is_val = (F.pmod(h, F.lit(1 << 30)) / float(1 << 30)) < F.lit(fraction)
        else:
            data_cols, is_val = list(df.columns), None

        W = self.num_workers
        n_files = int(num_partitions or df.rdd.getNumPartitions())
        n_files = max(W, int(math.ceil(n_files / W)) * W)
        block = int(parquet_row_group_size_mb * 1024 * 1024)
        train_url, val_url = store.get_train_data_path(dataset_idx), store.get_val_data_path(dataset_idx)
        marked = df.withColumn("__cerebro_is_val", is_val) if is_val is not None else df
        marked = marked.persist()  # both splits come from one evaluation of the input
        try:
            def write(part: Any, url: str) -> None:
                (part.select(*data_cols).repartition(n_files).write.mode("overwrite")
                 .option("parquet.block.size", block).parquet(url))

            if is_val is not None:
                write(marked.filter(~F.col("__cerebro_is_val")), train_url)
                write(marked.filter(F.col("__cerebro_is_val")), val_url)
            else:
                write(marked, train_url)
                _delete(val_url)  # stale validation rows of an earlier preparation would be used otherwise
        finally:
            marked.unpersist()
        train_rows, val_rows, metadata, avg = self.get_metadata_from_parquet(
            store, list(label_columns or []), list(feature_columns or []), dataset_idx=dataset_idx)
        if self.verbose >= 1:
            log.info("prepared data: %d train rows, %d validation rows, %d files each, in %s", train_rows, val_rows,
                     n_files, store.prefix_path)
        if train_rows and train_rows < W:
            log.warning("only %d training rows for %d workers: some workers have no data", train_rows, W)
        return train_rows, val_rows, metadata, avg

    def get_metadata_from_parquet(self, store: Any, label_columns: Sequence[str] = ("label",),
                                  feature_columns: Sequence[str] = ("features",), *,
                                  dataset_idx: Any = None) -> tuple[int, int, dict[str, Any], float]:
        """``(train_rows, val_rows, metadata, avg_row_size_bytes)`` of the prepared data.

        ``metadata`` maps each column to its Arrow type, numpy dtype and per-row shape. Columns
        named in ``label_columns``/``feature_columns`` must exist in the training data.
        """
        from cerebro_tasks.cerebro.data import column_metadata, count_rows, data_files

        train_url, val_url = store.get_train_data_path(dataset_idx), store.get_val_data_path(dataset_idx)
        if not data_files(train_url):
            raise FileNotFoundError(f"no prepared training data at {train_url}; call backend.prepare_data(store, df) "
                                    "or fit(df) first, or point the store's train_path at a Parquet/Petastorm dataset")
        metadata = column_metadata(train_url)
        wanted = [*feature_columns, *label_columns]
        missing = [c for c in wanted if c not in metadata]
        if missing:
            raise ValueError(f"column(s) {missing} not in the prepared training data at {train_url}; it has "
                             f"{sorted(metadata)}")
        train_rows = count_rows(train_url)
        val_rows = count_rows(val_url) if data_files(val_url) else 0
        size = _folder_bytes(train_url)
        n_files = len(data_files(train_url))
        if n_files < self.num_workers:
            log.warning("%s has %d file(s) for %d workers: workers beyond the files get no data (prepare_data writes "
                        "at least one file per worker)", train_url, n_files, self.num_workers)
        return train_rows, val_rows, metadata, (size / train_rows if train_rows else 0.0)

    def train_for_one_epoch(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("train_for_one_epoch is internal to Cerebro's epoch-synchronous scheduler; here "
                                  "models hop continuously (GridSearch/RandomSearch/TPESearch run them)")

    # for the searches ------------------------------------------------------------------------------------
    def mop_driver(self, workload: Any, run_url: str, *, seed: int, validate: bool,
                   select: tuple[Any, str] | None = None) -> Any:
        """A MOP driver for one search on this backend's Spark application (``select``: the
        selection metric's history keys and direction, whose best epoch's checkpoint is kept)."""
        from cerebro_tasks.mop.runtime import MopDriver

        return MopDriver(self.spark, workload, run_url, num_workers=self.num_workers, seed=seed,
                         start_timeout_s=self.start_timeout, validate=validate, schedule=self.schedule,
                         select=select)


def _use_driver_python(sc: Any) -> None:
    """Local Spark: run Python workers with the driver's interpreter unless PYSPARK_PYTHON says otherwise.

    A session built with ``SparkSession.builder`` (as Cerebro scripts do) otherwise starts workers
    with whatever ``python3`` is first on PATH, which often lacks the driver's packages (a venv).
    On a cluster the executors' interpreter is the cluster's business, so nothing changes there.
    """
    import os
    import sys

    master = str(getattr(sc, "master", "") or "")
    if master.startswith("local") and not os.environ.get("PYSPARK_PYTHON") and getattr(sc, "pythonExec", None) != sys.executable:
        log.info("SparkBackend: local Spark workers will run %s (set PYSPARK_PYTHON to choose another)", sys.executable)
        sc.pythonExec = sys.executable


def _delete(url: str) -> None:
    from cerebro_tasks.storage.store import Store

    s = Store(url)
    if s.exists():
        s.delete()


def _folder_bytes(url: str) -> int:
    from cerebro_tasks.cerebro.data import data_files
    from cerebro_tasks.storage.store import Store

    s = Store(url)
    return sum(s.fs.get_file_info(s.path(n)).size or 0 for n in data_files(url))
