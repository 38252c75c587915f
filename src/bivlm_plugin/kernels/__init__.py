"""Binary matmul kernels: torch reference, CPU and Triton kernels (issue 4: not built yet)."""
