"""What the project's command-line tools share and that is no part of either network: one-line
errors, whole-or-nothing output files (`cli`), and the malloc set-up of a training process
(`allocator`). Standard library only, so that any tool can import it before JAX or PyTorch."""
