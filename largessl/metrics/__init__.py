"""largessl.metrics."""
