"""Is there anything to convert? Answered from the manifest and a file listing, without Spark.

The hourly ingest mostly finds nothing new. Starting a Spark application to learn that cost 0.62
of a whole small conversion's wall time, all of it start-up; this check costs a listing of the
H5 tree and of the dataset folder plus two small JSON reads. It answers "nothing to do" only
when a full conversion would change nothing at all: every listed file has the size and mtime the
manifest recorded (or is the same quarantined file as last time), no file went away, the
quarantine report and the Petastorm metadata are current and no crashed run left parts or
staging behind. Anything else (even a touched file whose content may be unchanged) goes to the
real conversion, which decides under its lock.
"""

from __future__ import annotations

import posixpath
import time

import pyarrow.fs as pafs

from cerebro_tasks.deeppostures import petastorm_io as pio
from cerebro_tasks.deeppostures.convert import (
    MANIFEST_FORMAT,
    QUARANTINE_NAME,
    STAGING_DIR,
    _gaps,
    _petastorm_metadata_current,
    _study,
    list_h5_tree,
)
from cerebro_tasks.storage.store import Store

__all__ = ["unchanged_report"]


def unchanged_report(h5_root: str, dataset_url: str, timezone: str | None = None,
                     label_map: dict | str | None = None) -> dict | None:
    """The report of a conversion that would do nothing (``spark: False``), or None when one
    might do something and the real conversion must run. A time zone or label map other than the
    dataset's is refused here as the conversion would refuse it."""
    started = time.perf_counter()
    listed, rejected = list_h5_tree(h5_root)  # first: a missing or unreadable root fails here, clearly
    store = Store(dataset_url)
    if not store.exists(pio.MANIFEST_NAME) or not store.exists(QUARANTINE_NAME):
        return None
    manifest = store.read_json(pio.MANIFEST_NAME)
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("h5_root") != h5_root \
            or manifest.get("row_group_rows") != pio.DEFAULT_ROW_GROUP_ROWS:
        return None
    _study(manifest, store, timezone, label_map)  # the study asked for must be the one converted
    old_files: dict[str, dict] = manifest["files"]
    old_quarantine: dict[str, dict] = manifest.get("quarantine", {})

    kept, gap_refused = _gaps(listed)
    quarantine: dict[str, dict] = {}
    for f in kept:
        old = old_files.get(f["rel"])
        if old is not None and (old["size"], old["mtime_ns"]) == (f["size"], f["mtime_ns"]):
            continue
        oldq = old_quarantine.get(f["rel"])
        if oldq is None or (oldq.get("size"), oldq.get("mtime_ns")) != (f["size"], f["mtime_ns"]) \
                or oldq.get("field") == "date":
            return None  # new or changed: convert it
        quarantine[f["rel"]] = oldq
    for r in gap_refused:
        quarantine[r["rel"]] = {k: r[k] for k in ("path", "field", "problem", "size", "mtime_ns")}
    if quarantine != old_quarantine or {f["rel"] for f in kept} - set(quarantine) != set(old_files):
        return None  # a file went away, or the quarantine changed
    quarantine_list = sorted([{k: q[k] for k in ("path", "field", "problem")} for q in quarantine.values()]
                             + rejected, key=lambda q: q["path"])
    if store.read_json(QUARANTINE_NAME) != quarantine_list or _leftovers(store, old_files) \
            or not _petastorm_metadata_current(store, old_files):
        return None
    return {
        "h5_root": h5_root,
        "dataset_url": store.url,
        "version": int(manifest["version"]),
        "files": {"listed": len(listed) + len(rejected), "converted": 0, "skipped": len(old_files),
                  "unchanged_content": 0, "removed": 0, "quarantined": len(quarantine_list)},
        "windows": {"total": sum(int(e["windows"]) for e in old_files.values()), "converted": 0},
        "subjects": len({e["subject"] for e in old_files.values()}),
        "new_subjects": [],
        "removed": [],
        "quarantine": quarantine_list,
        "spark": False,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _leftovers(store: Store, files: dict[str, dict]) -> bool:
    """A staging folder or a part no manifest lists: what a crashed conversion leaves to clean up."""
    live = {e["part"] for e in files.values()}
    for info in store.fs.get_file_info(pafs.FileSelector(store.path(), allow_not_found=True)):
        name = posixpath.basename(info.path)
        if name == STAGING_DIR or (name.startswith("part-") and name.endswith(".parquet") and name not in live):
            return True
    return False
