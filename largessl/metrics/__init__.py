"""Collapse and representation-quality metrics."""

from largessl.metrics.collapse import collapse_metrics

__all__ = ["collapse_metrics"]
