"""largessl.dist."""
