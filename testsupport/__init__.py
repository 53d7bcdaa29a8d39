"""What the tests and the benchmarks share: local S3 servers (``servers``),
release series to store (``releases``), the DeltaGlider CLI (``dgcli``),
archive bombs (``bombs``) and the fuzz targets (``fuzz_targets``).

Neither tests/ nor benchmarks/ imports the other; both import this.
"""
