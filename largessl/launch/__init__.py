"""largessl.launch."""
