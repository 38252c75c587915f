"""Visual-token importance scores and keep-mask math, pure torch (later issue: not built yet)."""
