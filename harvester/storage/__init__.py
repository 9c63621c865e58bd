"""Storage: the output folder layout, lock, content-addressed store, manifest and run records."""
