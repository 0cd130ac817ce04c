"""Sizes the service fixes and the defaults every face shares, in one place so that the
CLI, `ebsfs.open` and the engine cannot drift apart."""

from __future__ import annotations

__version__ = "0.1.0"
"""The release (pyproject.toml reads it from here); recorded in manifests and the User-Agent."""

BLOCK_SIZE = 524288
"""Bytes in one EBS snapshot block; block index = byte offset // BLOCK_SIZE."""

GIB = 1024**3
BLOCKS_PER_GIB = GIB // BLOCK_SIZE

# Defaults of options that several faces (CLI, `ebsfs.open`, the engine) share.
DIFF_TIMEOUT = 600.0
"""Seconds a whole diff may take (`ebsfs diff --timeout`, a mounted `.changes` listing):
ample for a 16 TiB volume's listing at the service's quotas, and an end to an endpoint
that pages slowly for ever."""

READ_TIMEOUT = 60.0
"""Seconds one read may wait for its blocks before it fails with EIO (`--read-timeout`)."""

REQUEST_TIMEOUT = 20.0
"""Seconds one service call may go without progress before it is retried
(`--request-timeout`)."""

CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection to the endpoint."""

MAX_FETCHES = 256
"""GetSnapshotBlock calls in flight at the most (`--max-fetches`)."""

MAX_CONNECTIONS = 64
"""botocore's connection pool for the calls that go through boto3."""

NBD_HANDSHAKE_TIMEOUT = 30.0
"""Seconds an NBD client has from connecting to choosing an export (`ebsfs nbd`): a
client that connects and says nothing holds no connection for ever."""
