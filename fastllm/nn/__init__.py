"""Drop-in modules built on the fastllm ops (constructors: from_linear / from_module)."""

__all__: list[str] = []
