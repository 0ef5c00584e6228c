"""Benchmarks: the training and evaluation steps of JAX and PyTorch side by side
(`python -m bench`, bench/cli.py), the depthwise layer alone (`python -m bench --depthwise`), the
native kernels alone in C++ (`python -m bench.kernels`, kernel_layers.cc), the image-folder
input pipeline against torchvision's (`python -m bench.pipeline`), and inference latency in each
deployment runtime (`python -m bench.latency`).

NOTES.md is the record of what was measured and tried; results_cpu.json holds the latest table's
rows (`python -m bench --repeats 5 --out bench/results_cpu.json`).

Nothing here imports JAX or PyTorch at import time: the command line sets malloc up first
(`toolkit.allocator`), before either framework starts its threads.
"""
