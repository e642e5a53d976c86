"""snapcoord verify: dump verification and boot verification (docs/verify.md)."""
