"""largessl.train."""
