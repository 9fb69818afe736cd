"""Storage: the filesystem layer every room uses (local paths or pyarrow filesystems, atomic publish,
locks) in :mod:`.store`, and the run's on-disk layout in :mod:`.layout`. Imports nothing above it."""
