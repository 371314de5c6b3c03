"""Pure-JAX reference backend: runs anywhere (CPU/GPU/TPU) and is the oracle of the GPU suite.

It moves data with XLA collectives (all_to_all / all_gather) inside shard_map, so it is exact but not fast.
"""
