"""The read engine: block index, memory cache, fetches in worker threads, read-ahead,
lineage sharing, partitions, changed blocks, and the FUSE-free file nodes over them.
Nothing here imports pyfuse3."""
