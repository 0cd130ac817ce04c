"""The NBD face: the snapshots as Network Block Device exports over the read engine,
with `base:allocation` block status from the block index, so clients see the holes."""
