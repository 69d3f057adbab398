"""largessl.repro."""
