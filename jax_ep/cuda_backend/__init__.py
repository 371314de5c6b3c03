"""CUDA backend: FFI custom calls of jax_ep._C plus the communication runtime that owns their memory."""
