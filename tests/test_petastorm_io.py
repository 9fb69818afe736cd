"""The windows dataset format: encoding, decoding, writing and the readers."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cerebro_tasks.deeppostures import petastorm_io as pio


def _windows(n: int, subject: str, t0: int = 1_700_000_000, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "id": np.array([subject] * n, dtype=object),
        "time": t0 + 10 * np.arange(n, dtype=np.int64),
        "data": rng.normal(size=(n, 100, 3)).astype(np.float32),
        "non_wear": rng.integers(0, 2, n).astype(np.int32),
        "sleeping": rng.integers(0, 2, n).astype(np.int32),
        "label": rng.integers(-1, 2, n).astype(np.int32),
    }


def _write_dataset(folder: str, parts: dict[str, dict[str, np.ndarray]], row_group_rows: int = 64) -> None:
    fs = pafs.LocalFileSystem()
    os.makedirs(folder, exist_ok=True)
    row_groups = {}
    for name, w in parts.items():
        info = pio.write_windows_file(fs, os.path.join(folder, name), pio.windows_to_table(w),
                                      row_group_rows=row_group_rows)
        row_groups[name] = info["row_groups"]
    pio.write_petastorm_metadata(folder, row_groups)


def _assert_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key


def _concat(*ws: dict) -> dict:
    return {k: np.concatenate([w[k] for w in ws]) for k in ws[0]}


def test_encode_is_byte_identical_to_petastorm_ndarray_codec():
    from petastorm.codecs import NdarrayCodec

    data = np.random.default_rng(1).normal(size=(5, 100, 3)).astype(np.float32)
    cells = pio.encode_data(data)
    field = pio.WINDOW_SCHEMA.fields["data"]
    for i in range(5):
        assert cells[i].as_py() == bytes(NdarrayCodec().encode(field, data[i]))
    assert np.array_equal(pio.decode_data(cells), data)


def test_decode_accepts_list_columns_and_non_standard_cells():
    data = np.random.default_rng(2).normal(size=(4, 100, 3)).astype(np.float32)
    flat = pa.ListArray.from_arrays(pa.array(np.arange(5, dtype=np.int32) * 300), pa.array(data.reshape(-1)))
    assert np.array_equal(pio.decode_data(flat), data)
    nested = pa.array([[list(map(float, row)) for row in cell] for cell in data.astype(np.float64)])
    assert np.array_equal(pio.decode_data(nested), data)
    # float64 .npy cells (not our layout) go through the per-cell fallback
    import io

    cells = []
    for cell in data.astype(np.float64):
        buf = io.BytesIO()
        np.save(buf, cell)
        cells.append(buf.getvalue())
    assert np.array_equal(pio.decode_data(pa.array(cells, pa.binary())), data)


def test_decode_rejects_wrong_shapes_with_the_field_named():
    bad = pa.ListArray.from_arrays(pa.array([0, 299], pa.int32()), pa.array(np.zeros(299, np.float32)))
    with pytest.raises(pio.DatasetFormatError, match="field 'data': expected 300 non-null values per row"):
        pio.decode_data(bad)
    with pytest.raises(pio.DatasetFormatError, match=r"field 'data': expected shape \(N, 100, 3\)"):
        pio.encode_data(np.zeros((2, 3, 100), np.float32))


def test_read_windows_orders_by_id_then_time_and_selects_columns(tmp_path):
    a1, a2 = _windows(50, "A", seed=1), _windows(30, "A", t0=1_700_000_500, seed=2)
    b = _windows(40, "B", seed=3)
    folder = str(tmp_path / "ds")
    # File names deliberately out of (id, time) order: the reader must sort.
    _write_dataset(folder, {"part-0.parquet": b, "part-1.parquet": a2, "part-2.parquet": a1})
    got = pio.read_windows(folder)
    _assert_equal(got, _concat(a1, a2, b))
    assert got["data"].dtype == np.float32 and got["data"].shape == (120, 100, 3)
    assert got["time"].dtype == np.int64 and got["label"].dtype == np.int32
    only = pio.read_windows("file://" + folder, columns=["label", "data"])
    assert set(only) == {"label", "data"}
    assert np.array_equal(only["label"], got["label"])


def test_read_windows_of_some_subjects_skips_the_others(tmp_path):
    a, b, c = _windows(30, "A", seed=1), _windows(20, "B", seed=2), _windows(10, "C", seed=3)
    folder = str(tmp_path / "ds")
    # one file holding several subjects (the published example's layout) and one of its own
    _write_dataset(folder, {"part-0.parquet": _concat(a, b), "part-1.parquet": c}, row_group_rows=16)
    got = pio.read_windows(folder, subjects=["C", "A"])
    _assert_equal(got, _concat(a, c))
    assert len(pio.read_windows(folder, subjects=["Z"])["time"]) == 0


def test_iter_windows_yields_row_groups_and_empty_dataset_reads_empty(tmp_path):
    w = _windows(150, "A")
    folder = str(tmp_path / "ds")
    _write_dataset(folder, {"part-0.parquet": w}, row_group_rows=64)
    batches = list(pio.iter_windows(folder, columns=["time", "data"]))
    assert [len(b["time"]) for b in batches] == [64, 64, 22]
    assert np.array_equal(np.concatenate([b["data"] for b in batches]), w["data"])
    empty = str(tmp_path / "empty")
    _write_dataset(empty, {"part-0.parquet": _windows(0, "A")})
    got = pio.read_windows(empty)
    assert got["data"].shape == (0, 100, 3) and got["id"].shape == (0,)


def test_count_windows_counts_usable_rows(tmp_path):
    w = _windows(200, "A")
    folder = str(tmp_path / "ds")
    _write_dataset(folder, {"part-0.parquet": w})
    usable = int(((w["non_wear"] == 0) & (w["sleeping"] == 0) & (w["label"] != -1)).sum())
    assert pio.count_windows(folder) == {"A": {"windows": 200, "usable": usable}}


def test_petastorm_row_and_batch_readers_read_our_files(tmp_path):
    a, b = _windows(70, "A", seed=4), _windows(20, "B", seed=5)
    folder = str(tmp_path / "ds")
    _write_dataset(folder, {"part-0.parquet": a, "part-1.parquet": b})
    want = _concat(a, b)
    with pio.make_row_reader(folder, workers_count=1) as reader:
        rows = list(reader)
    assert [r.id for r in rows] == list(want["id"])
    assert np.array_equal(np.stack([r.data for r in rows]), want["data"])
    assert rows[0].data.shape == (100, 3) and rows[0].data.dtype == np.float32
    assert np.array_equal(np.array([r.label for r in rows]), want["label"])
    with pio.make_batch_reader(folder, workers_count=1) as reader:
        batches = [pio.decode_batch(batch) for batch in reader]
    got = {k: np.concatenate([bt[k] for bt in batches]) for k in batches[0]}
    order = np.lexsort((got["time"], got["id"].astype(str)))
    for key in pio.FIELDS:
        assert np.array_equal(got[key][order], want[key]), key


def test_metadata_round_trip(tmp_path):
    folder = str(tmp_path / "ds")
    _write_dataset(folder, {"part-0.parquet": _windows(10, "A")})
    unischema, row_groups, schema = pio.read_petastorm_metadata(folder)
    assert list(unischema.fields) == list(pio.FIELDS)
    assert row_groups == {"part-0.parquet": 1}
    assert schema.names == list(pio.FIELDS)
    assert pq.read_schema(os.path.join(folder, "part-0.parquet")).field("data").type == pa.binary()
