"""Limits shared by the API checks and the kernels (keep in sync with cuda/config.cuh)."""

MAX_TOPK = 32          # widest routing row the kernels accept
FP8_GROUP = 128        # channels per fp8 scale
PAYLOAD_ALIGN_BYTES = 16  # kernels move rows in 16-byte vectors
