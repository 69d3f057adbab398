"""largessl.hub."""
