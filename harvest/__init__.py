"""Harvest: run a language model once and cache residual-stream activations as sharded Zarr."""
__version__ = "0.1.0"
