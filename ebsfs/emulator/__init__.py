"""A local EBS direct API endpoint: real boto3 clients talk to it over HTTP.

`store` holds snapshots, tokens and paging (no HTTP), `faults` the knobs that make it
slow or unreliable on purpose, `server` the wire format, `ec2` EC2 DescribeSnapshots for
the same snapshots (so `ebsfs ls` works against it), `wire` the connections (how a
server unlike ours accepts, keeps and closes them), `__main__` the command.
"""

from ebsfs.emulator.faults import Faults
from ebsfs.emulator.server import EmulatorServer, ServerProfile
from ebsfs.emulator.store import ApiError, SnapshotStore

__all__ = ["ApiError", "EmulatorServer", "Faults", "ServerProfile", "SnapshotStore"]
