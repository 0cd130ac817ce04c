"""Filesystem metadata (ext4, NTFS, XFS, ...) as records, and `diff --files` over it."""
