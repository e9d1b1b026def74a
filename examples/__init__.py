"""Examples the README quotes and the tests exercise (not installed with the package)."""
