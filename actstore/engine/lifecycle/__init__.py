"""Whole-store operations: open and create, compaction, verify, clone and delete, info."""
