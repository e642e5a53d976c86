"""snapcoord verify: restore a stored dump into a throwaway server and compare (docs/verify.md)."""
