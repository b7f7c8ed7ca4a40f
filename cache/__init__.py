"""The cache-data layer: the cache format, stores and sharing, the held-out split and which rows are read."""
