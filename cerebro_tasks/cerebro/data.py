"""The prepared train/val data of a Cerebro store: Parquet files, read column-wise into numpy.

``SparkBackend.prepare_data`` writes ``<prefix>/train_data`` and ``<prefix>/val_data`` with Spark,
as plain Parquet (which Petastorm's ``make_batch_reader`` also reads) with at least one file per
worker. A MOP worker owns partition ``p``: it reads files ``p, p + W, p + 2W, ...`` of the sorted
file list, once, and keeps them in memory for every model that hops in.

Columns become numpy arrays: scalars 1-D, fixed-length lists (Spark arrays, Spark ML vectors
after ``vector_to_array``) 2-D or more for nested lists, Petastorm ``NdarrayCodec`` cells (binary
``np.save`` bytes) stacked, strings as object arrays. float64 becomes float32 (Keras trains in
float32; half the memory).
"""

from __future__ import annotations

import io
import posixpath
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cerebro_tasks.storage.store import Store

__all__ = ["data_files", "files_of_partition", "read_columns", "column_metadata", "count_rows", "empty_columns"]


def data_files(url: str) -> list[str]:
    """Names of the data files of a Parquet dataset folder, sorted (Spark's part order).

    Names starting with ``_`` or ``.`` are metadata (``_SUCCESS``, ``_common_metadata``),
    checksums (``.crc``) or writes in progress. An absent folder has no files.
    """
    store = Store(url)
    info = store.fs.get_file_info(store.path())
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        raise ValueError(f"{url}: expected a folder of Parquet files, found a single file")
    selector = pafs.FileSelector(store.path(), recursive=False)
    names = sorted(posixpath.basename(i.path) for i in store.fs.get_file_info(selector) if i.type == pafs.FileType.File)
    return [n for n in names if not n.startswith(("_", "."))]


def files_of_partition(files: Sequence[str], partition: int, num_partitions: int) -> list[str]:
    """File ``i`` belongs to partition ``i % num_partitions``."""
    if not 0 <= partition < num_partitions:
        raise ValueError(f"partition {partition} out of range for {num_partitions} partitions")
    return list(files[partition::num_partitions])


def read_columns(url: str, files: Sequence[str], columns: Sequence[str]) -> dict[str, np.ndarray]:
    """``columns`` of ``files`` (names inside the folder ``url``), concatenated, as numpy arrays."""
    store = Store(url)
    tables = []
    for name in files:
        with store.fs.open_input_file(store.path(name)) as f:
            pf = pq.ParquetFile(f)
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"{url}/{name}: no column(s) {missing}; the file has {pf.schema_arrow.names}")
            tables.append(pf.read(columns=list(columns)))
    if not tables:
        return empty_columns(columns)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return {c: to_numpy(table.column(c), c) for c in columns}


def empty_columns(columns: Sequence[str]) -> dict[str, np.ndarray]:
    return {c: np.zeros((0,), dtype="float32") for c in columns}


def to_numpy(column: pa.ChunkedArray, name: str = "?") -> np.ndarray:
    """One Arrow column as a dense numpy array (see the module docstring for the rules)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ValueError(f"column {name!r} has {arr.null_count} null value(s); training data must be complete")
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        out = _list_to_numpy(arr, name)
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        out = _npy_cells(arr, name)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        out = np.asarray(arr.to_pylist(), dtype=object)
    else:
        out = arr.to_numpy(zero_copy_only=False)
    if out.dtype == np.float64:
        out = out.astype(np.float32)
    return out


def _list_to_numpy(arr: pa.Array, name: str) -> np.ndarray:
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), dtype="float32")
    offsets = None if pa.types.is_fixed_size_list(arr.type) else arr.offsets.to_numpy()
    if offsets is not None:
        lengths = np.diff(offsets)
        if lengths.min() != lengths.max():
            raise ValueError(f"column {name!r} holds lists of different lengths ({lengths.min()}..{lengths.max()}); "
                             "feature and label columns must have one fixed length")
        width = int(lengths[0])
    else:
        width = arr.type.list_size
    values = arr.flatten()
    inner = _list_to_numpy(values, name) if pa.types.is_list(values.type) or pa.types.is_fixed_size_list(
        values.type) or pa.types.is_large_list(values.type) else values.to_numpy(zero_copy_only=False)
    return inner.reshape((n, width, *inner.shape[1:]))


def _npy_cells(arr: pa.Array, name: str) -> np.ndarray:
    cells = arr.to_pylist()
    try:
        return np.stack([np.load(io.BytesIO(c), allow_pickle=False) for c in cells]) if cells else np.zeros((0,))
    except ValueError as e:
        raise ValueError(f"column {name!r} is binary but its cells are not numpy arrays of one shape "
                         f"(Petastorm NdarrayCodec): {e}") from None


def column_metadata(url: str, columns: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per column of the dataset: its Arrow type, numpy dtype and per-row shape (from the first row)."""
    files = data_files(url)
    if not files:
        return {}
    store = Store(url)
    with store.fs.open_input_file(store.path(files[0])) as f:
        pf = pq.ParquetFile(f)
        names = list(columns) if columns is not None else pf.schema_arrow.names
        present = [c for c in names if c in pf.schema_arrow.names]
        first = pf.read_row_group(0, columns=present).slice(0, 1) if pf.num_row_groups else None
    out: dict[str, dict[str, Any]] = {}
    for c in present:
        field = pf.schema_arrow.field(c)
        entry: dict[str, Any] = {"arrow_type": str(field.type), "shape": None, "dtype": None}
        if first is not None and first.num_rows:
            try:
                value = to_numpy(first.column(c), c)
                entry["shape"] = list(value.shape[1:])
                entry["dtype"] = str(value.dtype)
            except ValueError as e:
                entry["error"] = str(e)
        out[c] = entry
    return out


def count_rows(url: str) -> int:
    """Rows of a dataset folder, from the Parquet footers (no data read)."""
    store = Store(url)
    total = 0
    for name in data_files(url):
        with store.fs.open_input_file(store.path(name)) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total
