"""Data layer: manifests of on-disk datasets, loading, task protocols, synthetic products, validation."""
