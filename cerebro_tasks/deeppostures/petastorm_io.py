"""The windows dataset on disk: schema, vectorised encode/decode, writing files, reading back.

This is the only module of the project that imports Petastorm (the stack is held back by it:
pyarrow <= 14, numpy < 2, pyspark 3.5), so that it can be replaced without touching the rest.

Schema (the published cerebro-spark DeepPostures example, field for field)::

    id        string        ScalarCodec(StringType)
    time      int64         ScalarCodec(LongType)      window start, epoch seconds
    data      float32 (100, 3)  NdarrayCodec           one Parquet BINARY cell = np.save() bytes
    non_wear  int32         ScalarCodec(IntegerType)
    sleeping  int32         ScalarCodec(IntegerType)
    label     int32         ScalarCodec(IntegerType)

Storage of ``data``: NdarrayCodec, the published example's storage, chosen by measurement
(``bench/convert.py``, "storage_choice": 311 k windows re-written one file per subject, 2
shared cores, run-to-run noise +-30 %). With row groups of 8,640 rows the codec column wrote at
~950 k windows/s against ~130 k/s for a plain ``list<float>`` column, and read back faster
through :func:`read_windows` (~370 k/s vs ~230 k/s) and Petastorm's batch reader (~350 k/s vs
~340 k/s): every cell of a (100, 3) float32 array is the same 128-byte ``.npy`` header plus
1,200 bytes, so a whole column decodes as one strided view of the Parquet value buffer.
Petastorm's row reader (``make_reader``) returns a list column flat, shape (300,), not
(100, 3), and keeping the codec means one format for datasets users converted with the
published example and for ours. :func:`read_windows` reads both anyway.

Row groups: 8,640 rows (one full day, one row group per converted file). 1,024 and 8,640 read
within the noise of each other; 65,536 read 40-55 % slower through every reader (and a
Petastorm reader holds a whole row group per worker). Compression: see :func:`parquet_writer`.

Readers:

* :func:`read_windows` - everything (or some columns) as numpy arrays, ordered by (id, time);
  column-wise with pyarrow, no per-row Python work. The training input path.
* :func:`iter_windows` - the same, one Parquet row group at a time (bounded memory).
* :func:`make_row_reader` / :func:`make_batch_reader` - Petastorm's own readers, for users and
  for tests that cross-check the two Petastorm paths.

A dataset URL is either a plain Parquet/Petastorm directory (the published example's output, a
split partition) or a converted dataset with ``_cerebro_manifest.json``: then the manifest is the
commit record and only the files it lists are read, so a reader never sees a conversion that is
still being published (see :mod:`cerebro_tasks.deeppostures.convert`).
"""

from __future__ import annotations

import io
import json
import pickle
import posixpath
import warnings
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cerebro_tasks.storage.store import Store

# Petastorm 0.12 calls pyarrow's legacy dataset API, which warns on every use (see stack.md); the
# warnings are attributed to Petastorm's modules, so this silences them and nothing else.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"petastorm(\.|$)")

__all__ = [
    "FIELDS",
    "DATA_SHAPE",
    "WINDOW_SCHEMA",
    "ARROW_SCHEMA",
    "MANIFEST_NAME",
    "DEFAULT_ROW_GROUP_ROWS",
    "DatasetFormatError",
    "encode_data",
    "decode_data",
    "windows_to_table",
    "table_to_windows",
    "parquet_writer",
    "write_windows_file",
    "write_petastorm_metadata",
    "read_petastorm_metadata",
    "dataset_files",
    "read_windows",
    "iter_windows",
    "count_windows",
    "make_row_reader",
    "make_batch_reader",
]

FIELDS: tuple[str, ...] = ("id", "time", "data", "non_wear", "sleeping", "label")
DATA_SHAPE: tuple[int, int] = (100, 3)
_DATA_CELL = DATA_SHAPE[0] * DATA_SHAPE[1]  # 300 float32 values per window
MANIFEST_NAME = "_cerebro_manifest.json"

# Rows per Parquet row group: 8,640 = one full day = 11.5 MB of `data`, one row group per
# converted file (measurements: module docstring). The converting task holds one day anyway.
DEFAULT_ROW_GROUP_ROWS = 8_640

# Per-column Parquet compression (see parquet_writer for the measurement behind it).
COMPRESSION: dict[str, str] = {"id": "snappy", "time": "snappy", "data": "none", "non_wear": "snappy",
                               "sleeping": "snappy", "label": "snappy"}

# Petastorm metadata keys (petastorm.etl.dataset_metadata), spelled here so that writing the
# metadata does not need a Spark job (materialize_dataset) and the footers are not re-read.
_UNISCHEMA_KEY = b"dataset-toolkit.unischema.v1"
_ROW_GROUPS_PER_FILE_KEY = b"dataset-toolkit.num_row_groups_per_file.v1"

# The exact bytes np.save writes in front of a C-ordered little-endian float32 (100, 3) array.
def _npy_header() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(DATA_SHAPE, dtype="<f4"))
    return buf.getvalue()[: -_DATA_CELL * 4]


_NPY_HEADER: bytes = _npy_header()
_NPY_CELL_BYTES = len(_NPY_HEADER) + _DATA_CELL * 4  # 1,328


class DatasetFormatError(ValueError):
    """A windows dataset (or one of its files) that does not have the expected columns/shapes."""


def _unischema():
    """Build the Unischema lazily-importable pieces (Petastorm imports pyspark types)."""
    from petastorm.codecs import NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField
    from pyspark.sql.types import IntegerType, LongType, StringType

    return Unischema("WindowSchema", [
        UnischemaField("id", np.str_, (), ScalarCodec(StringType()), False),
        UnischemaField("time", np.int64, (), ScalarCodec(LongType()), False),
        UnischemaField("data", np.float32, DATA_SHAPE, NdarrayCodec(), False),
        UnischemaField("non_wear", np.int32, (), ScalarCodec(IntegerType()), False),
        UnischemaField("sleeping", np.int32, (), ScalarCodec(IntegerType()), False),
        UnischemaField("label", np.int32, (), ScalarCodec(IntegerType()), False),
    ])


WINDOW_SCHEMA = _unischema()

# What our files hold physically (what Spark writes for WINDOW_SCHEMA.as_spark_schema()).
ARROW_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("time", pa.int64(), nullable=False),
    pa.field("data", pa.binary(), nullable=False),
    pa.field("non_wear", pa.int32(), nullable=False),
    pa.field("sleeping", pa.int32(), nullable=False),
    pa.field("label", pa.int32(), nullable=False),
])


# ------------------------------------------------------------------------------------------------
# data column: encode / decode
# ------------------------------------------------------------------------------------------------


def encode_data(data: np.ndarray) -> pa.Array:
    """(N, 100, 3) numbers -> a BINARY array whose cells are exactly ``np.save(float32 cell)``.

    Byte-identical to what Petastorm's NdarrayCodec.encode writes, built in one vectorised pass
    (NdarrayCodec calls np.save once per row: about 100x slower).
    """
    data = np.asarray(data)
    if data.ndim != 3 or data.shape[1:] != DATA_SHAPE:
        raise DatasetFormatError(f"field 'data': expected shape (N, 100, 3), found {data.shape}")
    n = data.shape[0]
    cells = np.empty((n, _NPY_CELL_BYTES), dtype=np.uint8)
    cells[:, : len(_NPY_HEADER)] = np.frombuffer(_NPY_HEADER, dtype=np.uint8)
    cells[:, len(_NPY_HEADER):].view("<f4").reshape(n, *DATA_SHAPE)[...] = data
    offsets = np.arange(n + 1, dtype=np.int64) * _NPY_CELL_BYTES
    # BINARY has int32 offsets: 1.6 M cells per array at most; LARGE_BINARY above that.
    if offsets[-1] < 2**31:
        return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets.astype(np.int32)),
                                                      pa.py_buffer(cells)])
    return pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(cells)])


def decode_data(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The ``data`` column, in any storage we accept, -> float32 (N, 100, 3).

    Accepted: NdarrayCodec BINARY cells (ours and the published example's; decoded as one strided
    view when every cell has the standard float32 header, else cell by cell with np.load), and
    plain Parquet ``list<float>``/``list<double>`` of 300 values or ``list<list<...>>`` of 100 x 3.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [_decode_data_chunk(chunk) for chunk in chunks if len(chunk)]
    if not parts:
        return np.empty((0, *DATA_SHAPE), dtype=np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _decode_data_chunk(arr: pa.Array) -> np.ndarray:
    if arr.null_count:
        raise DatasetFormatError(f"field 'data': expected no nulls, found {arr.null_count}")
    t = arr.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return _decode_npy_cells(arr)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _decode_list_cells(arr)
    raise DatasetFormatError(f"field 'data': expected NdarrayCodec binary or a list of floats, found {t}")


def _decode_npy_cells(arr: pa.Array) -> np.ndarray:
    n = len(arr)
    offset_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    _, offsets_buf, values_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[arr.offset: arr.offset + n + 1]
    lengths = np.diff(offsets)
    if (lengths == _NPY_CELL_BYTES).all():
        cells = np.frombuffer(values_buf, dtype=np.uint8)[offsets[0]: offsets[-1]].reshape(n, _NPY_CELL_BYTES)
        header = np.frombuffer(_NPY_HEADER, dtype=np.uint8)
        if (cells[:, : len(header)] == header).all():
            # One copy out of the Parquet buffer, no per-row Python work.
            return cells[:, len(header):].copy().view("<f4").reshape(n, *DATA_SHAPE)
    # Not our exact layout (float64 cells, big-endian, Fortran order...): decode each cell.
    out = np.empty((n, *DATA_SHAPE), dtype=np.float32)
    for i, cell in enumerate(arr):
        value = np.load(io.BytesIO(cell.as_py()), allow_pickle=False)
        if value.shape != DATA_SHAPE:
            raise DatasetFormatError(f"field 'data': expected cells of shape {DATA_SHAPE}, "
                                     f"found {value.shape} at row {i}")
        out[i] = value
    return out


def _decode_list_cells(arr: pa.Array) -> np.ndarray:
    n = len(arr)
    values = arr.flatten()
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or \
            pa.types.is_fixed_size_list(values.type):
        values = values.flatten()  # list<list<float>> of 100 x 3
    if len(values) != n * _DATA_CELL or values.null_count:
        raise DatasetFormatError(f"field 'data': expected {_DATA_CELL} non-null values per row, "
                                 f"found {len(values)} values (nulls: {values.null_count}) in {n} rows")
    if not pa.types.is_fixed_size_list(arr.type):
        lengths = np.diff(np.asarray(arr.offsets))
        if (lengths != lengths[0]).any():
            raise DatasetFormatError("field 'data': expected lists of equal length in every row")
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, *DATA_SHAPE)


# ------------------------------------------------------------------------------------------------
# tables <-> numpy
# ------------------------------------------------------------------------------------------------


def windows_to_table(windows: Mapping[str, np.ndarray]) -> pa.Table:
    """Numpy arrays of one or more subjects -> an Arrow table in :data:`ARROW_SCHEMA`.

    ``id`` may be one string (every row) or an (N,) array; ``data`` any float dtype (cast to
    float32, the schema's type); the flags and label any integer dtype (cast to int32).
    """
    n = int(np.asarray(windows["time"]).shape[0])
    ids = windows["id"]
    if isinstance(ids, str):
        id_array = pa.array(np.full(n, ids, dtype=object), pa.string())
    else:
        id_array = pa.array(np.asarray(ids, dtype=object), pa.string())
    columns = [
        id_array,
        pa.array(np.asarray(windows["time"]).astype(np.int64, copy=False)),
        encode_data(windows["data"]),
        pa.array(np.asarray(windows["non_wear"]).astype(np.int32, copy=False)),
        pa.array(np.asarray(windows["sleeping"]).astype(np.int32, copy=False)),
        pa.array(np.asarray(windows["label"]).astype(np.int32, copy=False)),
    ]
    for name, col in zip(FIELDS, columns):
        if len(col) != n:
            raise DatasetFormatError(f"field '{name}': expected {n} rows (the length of 'time'), found {len(col)}")
    if columns[2].type != pa.binary():  # > 1.6 M rows: keep one physical type per file
        columns[2] = columns[2].cast(pa.large_binary())
        return pa.Table.from_arrays(columns, schema=ARROW_SCHEMA.set(2, pa.field("data", pa.large_binary(), False)))
    return pa.Table.from_arrays(columns, schema=ARROW_SCHEMA)


def table_to_windows(table: pa.Table, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """An Arrow table of windows -> numpy: id object (str), time int64, data float32 (N, 100, 3),
    flags and label int32. Only ``columns`` (default: all six) are returned."""
    wanted = list(columns) if columns is not None else list(FIELDS)
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        if name not in table.column_names:
            raise DatasetFormatError(f"field '{name}': expected a column named {name!r}, "
                                     f"found only {table.column_names}")
        col = table.column(name)
        if name == "data":
            out[name] = decode_data(col)
        elif name == "id":
            if pa.types.is_dictionary(col.type):
                col = col.cast(pa.string())
            if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
                col = col.cast(pa.string())
            out[name] = col.to_numpy(zero_copy_only=False).astype(object, copy=False)
        elif name == "time":
            out[name] = col.to_numpy().astype(np.int64, copy=False)
        else:
            out[name] = col.to_numpy().astype(np.int32, copy=False)
    return out


def _empty_windows(columns: Sequence[str]) -> dict[str, np.ndarray]:
    empty = {
        "id": np.empty(0, dtype=object), "time": np.empty(0, np.int64),
        "data": np.empty((0, *DATA_SHAPE), np.float32), "non_wear": np.empty(0, np.int32),
        "sleeping": np.empty(0, np.int32), "label": np.empty(0, np.int32),
    }
    return {name: empty[name] for name in columns}


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------


def parquet_writer(sink, schema: pa.Schema | None = None, compression=None) -> pq.ParquetWriter:
    """A ParquetWriter with the settings every windows file of the project uses.

    * ``data`` uncompressed, the small columns snappy (:data:`COMPRESSION`): accelerometer
      floats barely compress (snappy saved 8 %, zstd 21 %) while snappy more than halved the
      read rate (1.30 M vs 0.56 M windows/s, one thread) and zstd cut the write rate 5x
      (bench/convert.py, "compression_choice");
    * dictionary encoding for ``id`` only (one subject per file: one dictionary entry);
    * statistics for ``id`` and ``time`` only (min/max of ``data`` bytes are useless).
    """
    return pq.ParquetWriter(sink, schema if schema is not None else ARROW_SCHEMA,
                            compression=compression if compression is not None else dict(COMPRESSION),
                            use_dictionary=["id"], write_statistics=["id", "time"])


def write_windows_file(fs: pafs.FileSystem, path: str, table: pa.Table, *,
                       row_group_rows: int = DEFAULT_ROW_GROUP_ROWS, compression=None) -> dict:
    """Write one Parquet file of windows; returns ``{"rows", "row_groups", "bytes"}``.

    Settings: :func:`parquet_writer`. ``compression`` overrides them (a codec name or a
    per-column dict), for measurements.
    """
    with fs.open_output_stream(path) as sink:
        writer = parquet_writer(sink, table.schema, compression)
        try:
            if table.num_rows == 0:
                writer.write_table(table)
            else:
                writer.write_table(table, row_group_size=max(1, int(row_group_rows)))
        finally:
            writer.close()
    # The footer, not arithmetic: Petastorm's metadata must match what is in the file exactly
    # (an empty table, for one, is written as zero row groups).
    with fs.open_input_file(path) as f:
        num_row_groups = pq.ParquetFile(f).metadata.num_row_groups
    info = fs.get_file_info(path)
    return {"rows": table.num_rows, "row_groups": num_row_groups, "bytes": int(info.size or 0)}


def write_petastorm_metadata(dataset_url: str, row_groups_per_file: Mapping[str, int], *,
                             unischema=None, arrow_schema: pa.Schema | None = None) -> None:
    """Write ``<dataset>/_common_metadata`` as Petastorm's ``materialize_dataset`` would, atomically.

    ``row_groups_per_file`` maps each data file's path relative to the dataset folder to its
    number of row groups: Petastorm readers look every listed piece up in it (a file missing from
    it makes them fail), so it must describe exactly the files in the folder.
    """
    store = Store(dataset_url)
    schema = arrow_schema if arrow_schema is not None else ARROW_SCHEMA
    meta = dict(schema.metadata or {})
    meta[_UNISCHEMA_KEY] = pickle.dumps(unischema if unischema is not None else WINDOW_SCHEMA)
    meta[_ROW_GROUPS_PER_FILE_KEY] = json.dumps(dict(sorted(row_groups_per_file.items()))).encode()
    sink = pa.BufferOutputStream()
    pq.write_metadata(schema.with_metadata(meta), sink)
    store.write_bytes(sink.getvalue().to_pybytes(), "_common_metadata")


def read_petastorm_metadata(dataset_url: str) -> tuple[object | None, dict[str, int] | None, pa.Schema | None]:
    """``(unischema, row_groups_per_file, arrow_schema)`` from ``_common_metadata``, Nones when absent."""
    store = Store(dataset_url)
    if not store.exists("_common_metadata"):
        return None, None, None
    with store.fs.open_input_file(store.path("_common_metadata")) as f:
        schema = pq.read_schema(f)
    meta = schema.metadata or {}
    unischema = None
    if _UNISCHEMA_KEY in meta:
        from petastorm.etl.legacy import depickle_legacy_package_name_compatible

        unischema = depickle_legacy_package_name_compatible(meta[_UNISCHEMA_KEY])
    row_groups = json.loads(meta[_ROW_GROUPS_PER_FILE_KEY].decode()) if _ROW_GROUPS_PER_FILE_KEY in meta else None
    return unischema, row_groups, schema.remove_metadata()


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------


def dataset_files(dataset_url: str, *, subjects: Sequence[str] | None = None,
                  as_of_ns: int | None = None) -> list[str]:
    """Filesystem paths of the data files of a dataset, in reading order.

    A converted dataset (with ``_cerebro_manifest.json``): exactly the files its manifest lists,
    ordered by (subject, date), only those of ``subjects`` when given, only those that had
    arrived before ``as_of_ns`` when given (:mod:`cerebro_tasks.deeppostures.arrivals`). Otherwise every visible
    file of the folder (names starting with ``_`` or ``.`` are metadata, checksums or in-flight
    writes), sorted by name as Petastorm does (``subjects`` is then applied by the reader).
    A URL naming a single Parquet file is that file.
    """
    store = Store(dataset_url)
    info = store.fs.get_file_info(store.path())
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{dataset_url}: expected a windows dataset, found nothing there")
    if info.type == pafs.FileType.File:
        return [store.path()]
    if store.exists(MANIFEST_NAME):
        from cerebro_tasks.deeppostures.arrivals import files_as_of

        manifest = store.read_json(MANIFEST_NAME)
        entries = sorted(files_as_of(manifest.get("files", {}), as_of_ns).values(),
                         key=lambda e: (e["subject"], e["date"]))
        if subjects is not None:
            wanted = set(subjects)
            entries = [e for e in entries if e["subject"] in wanted]
        return [store.path(e["part"]) for e in entries]
    selector = pafs.FileSelector(store.path(), recursive=False)
    names = sorted(posixpath.basename(i.path) for i in store.fs.get_file_info(selector)
                   if i.type == pafs.FileType.File)
    if as_of_ns is not None:
        raise ValueError(f"{dataset_url}: a dataset as of an instant needs the conversion manifest "
                         f"({MANIFEST_NAME}), which records when each file arrived")
    return [store.path(n) for n in names if not n.startswith(("_", "."))]


def _read_subjects(fs: pafs.FileSystem, path: str, columns: Sequence[str], subjects: Sequence[str]) -> pa.Table:
    """The rows of ``subjects`` in one file, skipping row groups whose id range misses them all."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        id_col = pf.schema_arrow.get_field_index("id")
        groups = []
        for i in range(pf.num_row_groups):
            stats = pf.metadata.row_group(i).column(id_col).statistics
            if stats is not None and stats.has_min_max:
                lo, hi = _as_str(stats.min), _as_str(stats.max)
                if not any(lo <= s <= hi for s in subjects):
                    continue
            groups.append(i)
        if not groups:
            return pa.table({})
        table = pf.read_row_groups(groups, columns=list(columns), use_threads=True)
    ids = table.column("id")
    if pa.types.is_dictionary(ids.type):
        ids = ids.cast(pa.string())
    return table.filter(pc.is_in(ids, value_set=pa.array(list(subjects), pa.string())))


def _as_str(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _read_file(fs: pafs.FileSystem, path: str, columns: Sequence[str] | None) -> pa.Table:
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read(columns=list(columns) if columns is not None else None,
                                      use_threads=True)


def _sort_by_id_time(table: pa.Table) -> pa.Table:
    """Sort by (id, time) unless already sorted (the normal case: one cheap vectorised check)."""
    if table.num_rows < 2 or "id" not in table.column_names or "time" not in table.column_names:
        return table
    ids = table.column("id")
    if pa.types.is_dictionary(ids.type):
        ids = ids.cast(pa.string())
    t = table.column("time")
    a_id, b_id = ids.slice(0, len(ids) - 1), ids.slice(1)
    a_t, b_t = t.slice(0, len(t) - 1), t.slice(1)
    out_of_order = pc.or_(pc.less(b_id, a_id), pc.and_(pc.equal(b_id, a_id), pc.less_equal(b_t, a_t)))
    if not pc.any(out_of_order).as_py():
        return table
    return table.take(pc.sort_indices(table.select(["id", "time"]),
                                      sort_keys=[("id", "ascending"), ("time", "ascending")]))


def read_windows(url: str, *, columns: Sequence[str] | None = None,
                 subjects: Sequence[str] | None = None, as_of_ns: int | None = None) -> dict[str, np.ndarray]:
    """All rows of a dataset or partition as numpy arrays, ordered by (id, time).

    Returns ``{"id": (N,) object str, "time": (N,) int64, "data": (N, 100, 3) float32,
    "non_wear"/"sleeping"/"label": (N,) int32}`` (only ``columns`` when given; ``id`` and
    ``time`` are read anyway for the ordering). Reads our storage and the published example's
    (NdarrayCodec) and plain list columns alike; column-wise, no per-row Python work.
    With ``subjects``, only their rows: files of other subjects are skipped when the manifest
    says which subject a file holds, and row groups by their ``id`` statistics otherwise. With
    ``as_of_ns``, only the files that had arrived before it (see :func:`dataset_files`).
    """
    wanted = list(columns) if columns is not None else list(FIELDS)
    unknown = [c for c in wanted if c not in FIELDS]
    if unknown:
        raise ValueError(f"columns: expected names among {list(FIELDS)}, found {unknown}")
    store = Store(url)
    to_read = list(dict.fromkeys(["id", "time", *wanted]))
    if subjects is None:
        tables = [_read_file(store.fs, p, to_read) for p in dataset_files(url, as_of_ns=as_of_ns)]
    else:
        keep = sorted(set(map(str, subjects)))
        tables = [_read_subjects(store.fs, p, to_read, keep)
                  for p in dataset_files(url, subjects=keep, as_of_ns=as_of_ns)]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return _empty_windows(wanted)
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    table = _sort_by_id_time(table)
    return table_to_windows(table, wanted)


def iter_windows(url: str, *, columns: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Like :func:`read_windows`, one Parquet row group at a time (memory: one row group).

    Files are visited in reading order (:func:`dataset_files`); each row group is sorted by
    (id, time) but the order across files is the files' order, which is (id, time) for converted
    datasets and split partitions.
    """
    wanted = list(columns) if columns is not None else list(FIELDS)
    store = Store(url)
    for path in dataset_files(url):
        with store.fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            to_read = list(dict.fromkeys(["id", "time", *wanted]))
            for rg in range(pf.num_row_groups):
                table = pf.read_row_group(rg, columns=to_read)
                if table.num_rows:
                    yield table_to_windows(_sort_by_id_time(table), wanted)


def count_windows(url: str, paths: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """Per subject: ``{"windows": all rows, "usable": rows usable for training}``.

    Usable = not sleeping, not non-wear and labelled (label != -1), the rows a training sequence
    may contain. Reads only the four small columns.
    """
    store = Store(url)
    out: dict[str, dict[str, int]] = {}
    for path in (paths if paths is not None else dataset_files(url)):
        t = _read_file(store.fs, path, ["id", "non_wear", "sleeping", "label"])
        if not t.num_rows:
            continue
        usable = pc.and_(pc.and_(pc.equal(t["non_wear"], 0), pc.equal(t["sleeping"], 0)),
                         pc.not_equal(t["label"], -1))
        grouped = pa.table({"id": t["id"].cast(pa.string()), "u": pc.cast(usable, pa.int64())}) \
            .group_by("id").aggregate([("u", "count"), ("u", "sum")])
        for sid, n, u in zip(grouped["id"].to_pylist(), grouped["u_count"].to_pylist(),
                             grouped["u_sum"].to_pylist()):
            acc = out.setdefault(sid, {"windows": 0, "usable": 0})
            acc["windows"] += int(n)
            acc["usable"] += int(u or 0)
    return out


# ------------------------------------------------------------------------------------------------
# Petastorm's readers
# ------------------------------------------------------------------------------------------------


def _petastorm_url(url: str) -> str:
    store = Store(url)
    return store.url_of()


def make_row_reader(url: str, **kwargs):
    """Petastorm ``make_reader`` on a dataset (rows as namedtuples, ``data`` decoded (100, 3)).

    Defaults differ from Petastorm's for reproducibility: no row-group shuffling, one epoch.
    The dataset must carry Petastorm metadata (``_common_metadata``), as ours and the published
    example's do.
    """
    from petastorm import make_reader

    kwargs.setdefault("shuffle_row_groups", False)
    kwargs.setdefault("num_epochs", 1)
    return make_reader(_petastorm_url(url), **kwargs)


def make_batch_reader(url: str, **kwargs):
    """Petastorm ``make_batch_reader`` on a dataset (batches as namedtuples of numpy columns).

    Petastorm returns NdarrayCodec fields as raw bytes here; pass each batch through
    :func:`decode_batch` to get ``data`` as float32 (n, 100, 3).
    """
    from petastorm import make_batch_reader as _make_batch_reader

    kwargs.setdefault("shuffle_row_groups", False)
    kwargs.setdefault("num_epochs", 1)
    with warnings.catch_warnings():
        # "Please use make_reader...": we do decode the codec column ourselves (decode_batch).
        warnings.filterwarnings("ignore", message="Please use make_reader", category=UserWarning)
        return _make_batch_reader(_petastorm_url(url), **kwargs)


def decode_batch(batch) -> dict[str, np.ndarray]:
    """A Petastorm batch (namedtuple or dict of columns) -> our numpy dict (data decoded)."""
    cols = batch._asdict() if hasattr(batch, "_asdict") else dict(batch)
    out: dict[str, np.ndarray] = {}
    for name, value in cols.items():
        if name == "data":
            value = np.asarray(value)
            if value.dtype == object:  # raw NdarrayCodec bytes, one Python bytes per row
                out[name] = decode_data(pa.array(list(value), pa.binary()))
            else:  # a list column, already stacked by Petastorm
                out[name] = value.astype(np.float32, copy=False).reshape(len(value), *DATA_SHAPE)
        elif name == "id":
            out[name] = np.asarray(value).astype(object)
        elif name == "time":
            out[name] = np.asarray(value).astype(np.int64, copy=False)
        elif name in FIELDS:
            out[name] = np.asarray(value).astype(np.int32, copy=False)
    return out
