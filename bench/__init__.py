"""Microbenchmarks of fastllm (importable as fastllm.bench; run with `fastllm bench`)."""
