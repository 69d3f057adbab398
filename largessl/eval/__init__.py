"""largessl.eval."""
