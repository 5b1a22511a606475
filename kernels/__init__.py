"""Triton kernels of the engine (noise generation fused with forward passes and class counting).

Each kernel sits beside a plain-PyTorch reference (``<op>_ref``) and has its own test
(``tests/test_<op>.py``) and benchmark (``bench/bench_<op>.py``):

- :mod:`engine.kernels.noisy_batch` -- keyed noise + replicate + scale + cast into the forward batch.
- :mod:`engine.kernels.discrete_noise` -- the same for the sound noise on the 8-bit grid (``noise="discrete"``).
- :mod:`engine.kernels.class_counts` -- argmax -> per-image histogram; the last linear layer fused with it.
- :mod:`engine.kernels.mlp_counts` -- a whole MLP from in-kernel noise to counts.
- :mod:`engine.kernels.noisy_conv_pool` -- a LeNet-like first layer (conv, ReLU, 2x2 maxpool) from in-kernel noise.

Shared device code: :mod:`engine.kernels.philox_normal` (the noise stream of :mod:`engine.noise`, bit for
bit) and :mod:`engine.kernels.packed_rows` (the image-major row layout). The engine uses them through
:mod:`engine.accel`. Triton needs a CUDA device; ``TRITON_INTERPRET=1`` runs them on the CPU (tests).
"""

__all__ = ["noisy_batch", "discrete_noise", "class_counts", "mlp_counts", "noisy_conv_pool", "philox_normal", "packed_rows"]
