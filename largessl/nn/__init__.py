"""Layers whose statistics are over the global batch of all ranks."""

from largessl.nn.batchnorm import GlobalBatchNorm1d, global_mean_var

__all__ = ["GlobalBatchNorm1d", "global_mean_var"]
