"""largessl.distributed."""
