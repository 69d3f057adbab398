"""largessl.data."""
