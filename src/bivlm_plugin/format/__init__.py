"""On-disk / in-memory packed layout of Bi-VLM layers (issue 4: not built yet)."""
