"""Layers whose statistics are over the global batch of all ranks."""

from largessl.nn.batchnorm import GlobalBatchNorm, GlobalBatchNorm1d, convert_to_global_bn, global_mean_var
from largessl.nn.whitening import DBN, ShuffledDBN, inv_sqrt_newton_schulz, inv_sqrt_psd

__all__ = ["DBN", "GlobalBatchNorm", "GlobalBatchNorm1d", "convert_to_global_bn", "ShuffledDBN", "global_mean_var", "inv_sqrt_newton_schulz", "inv_sqrt_psd"]
