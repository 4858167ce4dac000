"""numba CPU kernels, one module per op. They trust their inputs: call them
only through ``fastloss.ops``, which validates."""
