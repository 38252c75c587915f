"""The Bi-VLM algorithm and its baselines as plain tensor functions.

Scope: partition, binarization, refinement, Hessian accumulation, error compensation and bit
accounting, on one weight matrix at a time. Non-goals: module traversal, hooks, file formats,
framework integration (those live in ``integrations/`` and ``format/``). This package imports
torch and the standard library only; ``tests/test_layering.py`` enforces it.
"""
