"""Binary matmul kernels on the packed layout: torch reference, AVX512 CPU kernel (built lazily),
Triton kernel, a ``can_implement`` chooser and the ``bivlm::binary_linear`` custom op
(``kernels.ops``; importing that module registers the op). Nothing is built or imported here."""
