"""Triton kernels of fastllm, one file per op family.

Imported as `fastllm.triton_kernels` (never as a top-level `triton_kernels`, a
name the Triton project owns). Importing a module here imports triton; the
package itself imports without it.
"""
