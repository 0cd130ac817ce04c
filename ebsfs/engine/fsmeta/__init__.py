"""Where a filesystem keeps its metadata (ext4, XFS, NTFS), found by reading the
filesystem itself, so the engine can fetch those blocks ahead of a tool's walk. Pure
parsing over an async read: no engine, no trio tasks, no FUSE."""
