"""Proving backups restorable: ``snapcoord verify`` (docs/verify.md)."""
