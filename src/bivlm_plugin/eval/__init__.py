"""Evaluation harnesses: protocol P1 perplexity (``data``, ``ppl``)."""
