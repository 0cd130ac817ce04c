"""Fleet scanning (`ebsfs scan`): many snapshots' file listings on a Dask cluster.
records.py is one snapshot's lines (no Dask), tasks.py what a worker runs, cluster.py
the client's side (cluster, placement, submission), ratelimit.py the cluster-wide
GetSnapshotBlock limit, output.py the resumable --out file."""
