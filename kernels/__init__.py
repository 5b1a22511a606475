"""Triton kernels of the engine (noise generation fused with forward passes and class counting).

Each kernel sits beside a plain-PyTorch reference and has its own test and benchmark.
"""
