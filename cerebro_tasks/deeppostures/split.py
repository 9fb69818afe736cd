"""Subject-level train / validation (/ test) split and balanced worker partitions.

Which split a subject is in is decided by a hash of ``(seed, subject id)`` alone, never by
shuffling the current list of subjects: ``u = blake2b(seed, subject) / 2**64`` in [0, 1), and
the subject is *train* when ``u < 1 - val - test``, *val* when ``u < 1 - test``, else *test*.
So a subject keeps its split when others arrive (a subject that was in training stays in
training), and raising a fraction only moves subjects out of training, never into it. The split
fractions are met in expectation; the report gives the realised ones.

Each split is then cut into ``W`` partitions of whole subjects for the ``W`` MOP workers, by
greedy largest-first bin packing on the windows usable for training (not sleeping, worn,
labelled), because a MOP epoch lasts as long as its slowest partition. The report gives the
imbalance ``max/mean - 1`` of usable windows per partition. The partitions (not the split) are
recomputed from scratch on every run: they only have to be balanced, not stable.

Layout written (``docs/design.md``)::

    <prepared>/split.json            this module's report (+ what it was computed from)
    <prepared>/train/part-<i>/       i = 0..W-1, each a Petastorm dataset of whole subjects
    <prepared>/val/part-<i>/
    <prepared>/test/                 only with test_fraction > 0: one dataset, not partitioned

Every partition holds one Parquet file per subject, ``part-<rank>.parquet`` with ranks in
subject order, rows ordered by time: the dataset is ordered by (id, time) on disk.
Partitions are written on the executors (one task per subject, memory: one day file at a time)
into a hidden staging folder beside ``<prepared>``, which then replaces ``<prepared>`` by rename:
a reader sees the old split or the new one, never a mix. A re-run with the same dataset
version, seed, fractions and W finds the same ``split.json`` and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
import uuid
from typing import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cerebro_tasks.deeppostures import petastorm_io as pio
from cerebro_tasks.deeppostures.arrivals import files_as_of
from cerebro_tasks.storage.store import Store

__all__ = ["SPLITS", "subject_unit", "assign_split", "assign_splits", "balance_partitions",
           "write_split", "read_split", "partition_url"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_FILE = "split.json"
_FORMAT = "cerebro-split/1"


# ------------------------------------------------------------------------------------------------
# the pure part: which split, which partition
# ------------------------------------------------------------------------------------------------


def subject_unit(subject: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, subject) alone: the subject's place in the split."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{subject}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name}: expected a fraction in [0, 1), found {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction: expected < 1 so that training keeps subjects, "
                         f"found {val_fraction} + {test_fraction}")


def assign_split(subject: str, seed: int, val_fraction: float = 0.3, test_fraction: float = 0.0) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for one subject (see the module docstring)."""
    _check_fractions(val_fraction, test_fraction)
    u = subject_unit(subject, seed)
    if u < 1.0 - val_fraction - test_fraction:
        return "train"
    if u < 1.0 - test_fraction:
        return "val"
    return "test"


def assign_splits(subjects: Sequence[str], seed: int, val_fraction: float = 0.3,
                  test_fraction: float = 0.0) -> dict[str, list[str]]:
    """Every subject's split: ``{"train": [...], "val": [...], "test": [...]}``, each sorted."""
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    for subject in sorted(set(subjects)):
        out[assign_split(subject, seed, val_fraction, test_fraction)].append(subject)
    return out


def balance_partitions(weights: Mapping[str, int], workers: int) -> list[list[str]]:
    """Whole subjects into ``workers`` partitions of nearly equal total weight.

    Greedy largest-first (LPT): subjects by decreasing weight (ties by id), each to the lightest
    partition so far (ties by index). Deterministic; within 4/3 of the optimal makespan, and in
    practice within a few percent when subjects are many and alike. Subjects inside a partition
    are returned sorted by id.
    """
    if int(workers) < 1:
        raise ValueError(f"workers: expected at least 1, found {workers!r}")
    parts: list[list[str]] = [[] for _ in range(int(workers))]
    loads = [0] * int(workers)
    for subject in sorted(weights, key=lambda s: (-int(weights[s]), s)):
        target = min(range(len(parts)), key=lambda i: (loads[i], i))
        parts[target].append(subject)
        loads[target] += int(weights[subject])
    return [sorted(p) for p in parts]


def _imbalance(loads: Sequence[int]) -> float:
    """max/mean - 1 (0 = perfectly balanced); 0 for no load at all."""
    if not loads or sum(loads) == 0:
        return 0.0
    return max(loads) / (sum(loads) / len(loads)) - 1.0


def partition_url(prepared_url: str, split: str, part: int) -> str:
    """The URL of one partition, as the training step reads it."""
    return Store(prepared_url).url_of(split, f"part-{int(part)}")


def read_split(prepared_url: str) -> dict:
    """The ``split.json`` report of a prepared split."""
    return Store(prepared_url).read_json(SPLIT_FILE)


# ------------------------------------------------------------------------------------------------
# what the dataset holds: subjects, their files, their window counts
# ------------------------------------------------------------------------------------------------


def _dataset_inventory(dataset_url: str, spark, as_of_ns: int | None = None) -> tuple[dict[str, dict], str]:
    """``{subject: {"windows", "usable", "files": [paths]}}`` and a version key of the dataset.

    A converted dataset answers from its manifest (no data read). Any other Petastorm dataset
    (e.g. the published example's output, where one file holds many subjects) is scanned on the
    executors, reading only the id, flag and label columns.
    """
    store = Store(dataset_url)
    files = pio.dataset_files(dataset_url, as_of_ns=as_of_ns)
    if store.exists(pio.MANIFEST_NAME):
        live = files_as_of(store.read_json(pio.MANIFEST_NAME)["files"], as_of_ns)
        inventory: dict[str, dict] = {}
        for entry in sorted(live.values(), key=lambda e: (e["subject"], e["date"])):
            acc = inventory.setdefault(entry["subject"], {"windows": 0, "usable": 0, "files": []})
            acc["windows"] += int(entry["windows"])
            acc["usable"] += int(entry["usable"])
            acc["files"].append(store.path(entry["part"]))
        version = hashlib.sha256(json.dumps(
            sorted((e["part"], e["windows"]) for e in live.values())).encode()).hexdigest()
        return inventory, version

    infos = store.fs.get_file_info(files)
    version = hashlib.sha256(json.dumps(
        [(i.path, i.size, i.mtime_ns) for i in infos]).encode()).hexdigest()
    sc = spark.sparkContext
    url = dataset_url
    per_file = sc.parallelize(files, max(1, min(len(files), sc.defaultParallelism * 4))) \
        .map(lambda path: (path, pio.count_windows(url, [path]))).collect()
    inventory = {}
    for path, counts in sorted(per_file):
        for subject, c in counts.items():
            acc = inventory.setdefault(subject, {"windows": 0, "usable": 0, "files": []})
            acc["windows"] += c["windows"]
            acc["usable"] += c["usable"]
            acc["files"].append(path)
    return inventory, version


# ------------------------------------------------------------------------------------------------
# executor side
# ------------------------------------------------------------------------------------------------


def _normalise(table: pa.Table) -> pa.Table:
    """Any accepted windows table -> exactly :data:`petastorm_io.ARROW_SCHEMA` (codec ``data``)."""
    data = table.column("data")
    if pa.types.is_binary(data.type) or pa.types.is_large_binary(data.type):
        data = data.cast(pa.binary())  # already NdarrayCodec cells: keep the bytes
    else:
        data = pio.encode_data(pio.decode_data(data))
    ids = table.column("id")
    if pa.types.is_dictionary(ids.type):
        ids = ids.cast(pa.string())
    columns = [ids.cast(pa.string()), table.column("time").cast(pa.int64()), data,
               table.column("non_wear").cast(pa.int32()), table.column("sleeping").cast(pa.int32()),
               table.column("label").cast(pa.int32())]
    return pa.Table.from_arrays(columns, schema=pio.ARROW_SCHEMA)


def _subject_rows(fs: pafs.FileSystem, path: str, subject: str, filter_rows: bool) -> list[pa.Table]:
    """One subject's rows of one source file, normalised to our schema.

    In files holding many subjects (the published example's, sorted by id) only the row groups
    whose ``id`` statistics can contain the subject are read, one at a time, so a task holds
    the subject's rows plus one row group, not whole files.
    """
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        if not filter_rows:
            return [_normalise(pf.read(columns=list(pio.FIELDS)))]
        id_index = pf.schema_arrow.get_field_index("id")
        tables = []
        for rg in range(pf.num_row_groups):
            stats = pf.metadata.row_group(rg).column(id_index).statistics
            if stats is not None and stats.has_min_max:
                low, high = (v.decode("utf-8") if isinstance(v, bytes) else v for v in (stats.min, stats.max))
                if not low <= subject <= high:
                    continue
            t = pf.read_row_group(rg, columns=list(pio.FIELDS))
            ids = t.column("id")
            if pa.types.is_dictionary(ids.type) or not pa.types.is_string(ids.type):
                ids = ids.cast(pa.string())
            t = t.filter(pc.equal(ids, subject))
            if t.num_rows:
                tables.append(_normalise(t))
        return tables


def _write_subject(task: dict) -> dict:
    """Executor: write one subject's rows (from its source files, in time order) as one file.

    Memory: the subject's rows (about 90 MB for 8 full days) plus one source row group.
    """
    out_store = Store(task["out_url"])
    src_store = Store(task["dataset_url"])
    out_store.fs.create_dir(posixpath.dirname(out_store.path(task["file"])), recursive=True)
    tables: list[pa.Table] = []
    for path in task["sources"]:
        tables.extend(_subject_rows(src_store.fs, path, task["subject"], task["filter"]))
    table = pa.concat_tables(tables) if tables else pio.ARROW_SCHEMA.empty_table()
    del tables
    # Sources are one file per day (ours) or sorted by (id, time) (the published example's), but
    # a subject's rows must come out in time order whatever the source: check, sort if needed.
    if table.num_rows > 1:
        t_col = table.column("time")
        if pc.any(pc.less_equal(t_col.slice(1), t_col.slice(0, len(t_col) - 1))).as_py():
            table = table.take(pc.sort_indices(table, sort_keys=[("time", "ascending")]))
    info = pio.write_windows_file(out_store.fs, out_store.path(task["file"]), table,
                                  row_group_rows=pio.DEFAULT_ROW_GROUP_ROWS)
    return {"file": task["file"], "rows": info["rows"], "row_groups": info["row_groups"],
            "usable_labels": usable_labels(table)}


def usable_labels(table: pa.Table) -> dict[str, int]:
    """``{label: windows}`` of the windows training can use (worn, awake, labelled): what the
    class weights are made of, counted here so that training needs no pass over the data."""
    usable = pc.and_(pc.and_(pc.equal(table.column("sleeping"), 0), pc.equal(table.column("non_wear"), 0)),
                     pc.greater_equal(table.column("label"), 0))
    counts = pc.value_counts(table.column("label").filter(usable))
    return {str(v): int(c) for v, c in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())}


# ------------------------------------------------------------------------------------------------
# the job
# ------------------------------------------------------------------------------------------------


def write_split(dataset_url: str, prepared_url: str, *, workers: int, seed: int,
                val_fraction: float = 0.3, test_fraction: float = 0.0, spark=None,
                as_of_ns: int | None = None) -> dict:
    """Split a windows dataset by subject and write balanced partitions for ``workers`` workers.

    Returns the report also stored as ``<prepared>/split.json``: subjects per split and per
    partition, windows and usable windows per partition (and the usable ones by label,
    ``usable_labels``), ``imbalance`` (max/mean - 1 of usable windows) per split, realised
    fractions, ``reused`` (True when an identical split was already there and nothing was
    written) and ``seconds``. With ``as_of_ns``, the dataset as it was then:
    only the files that had arrived before it (:mod:`cerebro_tasks.deeppostures.arrivals`).
    """
    started = time.perf_counter()
    _check_fractions(val_fraction, test_fraction)
    if int(workers) < 1:
        raise ValueError(f"workers: expected at least 1, found {workers!r}")
    workers = int(workers)
    if spark is None:
        from cerebro_tasks.spark_session import get_spark

        spark = get_spark("cerebro-split")

    inventory, version = _dataset_inventory(dataset_url, spark, as_of_ns)
    if not inventory:
        raise ValueError(f"{dataset_url}: expected windows of at least one subject, found none")
    key = {"format": _FORMAT, "dataset_version": version, "seed": int(seed), "workers": workers,
           "val_fraction": float(val_fraction), "test_fraction": float(test_fraction)}

    out = Store(prepared_url)
    if out.exists(SPLIT_FILE):
        try:
            previous = out.read_json(SPLIT_FILE)
        except (OSError, ValueError):
            previous = None
        if previous is not None and previous.get("key") == key:
            previous["reused"] = True
            previous["seconds"] = round(time.perf_counter() - started, 3)
            log.info("split: %s already holds this split; nothing written", prepared_url)
            return previous

    splits = assign_splits(list(inventory), seed, val_fraction, test_fraction)
    wanted = ["train", "val"] if val_fraction > 0 else ["train"]
    if test_fraction > 0:
        wanted.append("test")
    for name in wanted:
        if not splits[name]:
            raise ValueError(
                f"split '{name}': expected at least one subject, found none among {len(inventory)} "
                f"subjects with seed {seed} and fractions train/val/test = "
                f"{1 - val_fraction - test_fraction:.2f}/{val_fraction:.2f}/{test_fraction:.2f}; "
                "use more subjects or another seed")

    # Plan every output file: (split, partition, rank) -> subject.
    tasks: list[dict] = []
    report_parts: dict[str, list[dict]] = {}
    stage_name = f".{posixpath.basename(out.path().rstrip('/'))}.staging-{uuid.uuid4().hex[:12]}"
    parent = posixpath.dirname(out.path().rstrip("/"))
    stage_path = posixpath.join(parent, stage_name)
    stage_url = _sibling_url(prepared_url, stage_name)
    multi_subject_files = _files_hold_many_subjects(inventory)
    for name in wanted:
        subjects = splits[name]
        layout = balance_partitions({s: inventory[s]["usable"] for s in subjects},
                                    workers if name != "test" else 1)
        report_parts[name] = []
        for p, members in enumerate(layout):
            folder = f"{name}/part-{p}" if name != "test" else "test"
            for rank, subject in enumerate(members):
                tasks.append({"dataset_url": dataset_url, "out_url": stage_url, "subject": subject,
                              "sources": inventory[subject]["files"], "filter": multi_subject_files,
                              "file": f"{folder}/part-{rank:05d}.parquet"})
            if not members:  # an empty partition is still a readable (empty) dataset
                tasks.append({"dataset_url": dataset_url, "out_url": stage_url, "subject": "",
                              "sources": [], "filter": False, "file": f"{folder}/part-00000.parquet"})
            report_parts[name].append({
                "part": p, "path": folder, "subjects": members,
                "windows": sum(inventory[s]["windows"] for s in members),
                "usable_windows": sum(inventory[s]["usable"] for s in members),
            })

    sc = spark.sparkContext
    try:
        written = sc.parallelize(tasks, max(1, len(tasks))).map(_write_subject).collect()
        row_groups_by_folder: dict[str, dict[str, int]] = {}
        labels_by_folder: dict[str, dict[str, int]] = {}
        for w in written:
            folder, fname = posixpath.split(w["file"])
            row_groups_by_folder.setdefault(folder, {})[fname] = w["row_groups"]
            labels = labels_by_folder.setdefault(folder, {})
            for label, count in (w.get("usable_labels") or {}).items():
                labels[label] = labels.get(label, 0) + count
        if all("usable_labels" in w for w in written):  # (executors of an older version count none)
            for parts in report_parts.values():
                for part in parts:
                    counts = labels_by_folder.get(part["path"], {})
                    part["usable_labels"] = {label: counts[label] for label in sorted(counts, key=int)}
        for folder, row_groups in row_groups_by_folder.items():
            pio.write_petastorm_metadata(_sibling_url(prepared_url, stage_name, folder), row_groups)

        total = {name: sum(inventory[s]["windows"] for s in splits[name]) for name in SPLITS}
        n_subjects = len(inventory)
        report = {
            "key": key,
            "dataset_url": dataset_url,
            "prepared_url": prepared_url,
            "seed": int(seed),
            "workers": workers,
            "fractions": {"train": 1.0 - val_fraction - test_fraction, "val": float(val_fraction),
                          "test": float(test_fraction)},
            "realised_fractions": {name: len(splits[name]) / n_subjects for name in SPLITS},
            "subjects": {name: splits[name] for name in SPLITS},
            "windows": total,
            "usable_windows": {name: sum(inventory[s]["usable"] for s in splits[name]) for name in SPLITS},
            "partitions": report_parts,
            "imbalance": {name: _imbalance([p["usable_windows"] for p in parts])
                          for name, parts in report_parts.items()},
            "empty_partitions": {name: [p["part"] for p in parts if not p["subjects"]]
                                 for name, parts in report_parts.items()},
            "reused": False,
        }
        Store(_sibling_url(prepared_url, stage_name)).write_json(report, SPLIT_FILE)
        out.swap_in(stage_path)
    except BaseException:
        _remove_quietly(out.fs, stage_path)
        raise
    for name, parts in report_parts.items():
        if name != "test" and report["empty_partitions"][name]:
            log.warning("split '%s': partitions %s are empty (%d subjects for %d workers)", name,
                        report["empty_partitions"][name], len(splits[name]), workers)
    report["seconds"] = round(time.perf_counter() - started, 3)
    log.info("split: train %d / val %d / test %d subjects; imbalance %s", len(splits["train"]),
             len(splits["val"]), len(splits["test"]), report["imbalance"])
    return report


def _files_hold_many_subjects(inventory: Mapping[str, dict]) -> bool:
    """True when some file holds rows of more than one subject (then rows must be filtered)."""
    seen: dict[str, str] = {}
    for subject, info in inventory.items():
        for path in info["files"]:
            if seen.setdefault(path, subject) != subject:
                return True
    return False


def _sibling_url(url: str, name: str, *parts: str) -> str:
    """URL of ``name`` beside ``url`` (same folder, same filesystem), plus ``parts`` inside it."""
    store = Store(url)
    base = posixpath.dirname(store.path().rstrip("/"))
    if store.is_local:
        return posixpath.join(base, name, *parts)
    trimmed = url.rstrip("/")
    return "/".join([trimmed.rsplit("/", 1)[0], name, *parts])


def _remove_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
    except OSError as err:  # leftovers are hidden (dot names) and harmless; say so and go on
        log.warning("could not remove %s: %s", path, err)
