"""largessl.bench."""
