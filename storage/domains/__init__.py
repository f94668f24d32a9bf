"""Storage domains: the ``StorageDomain.*`` service, mounts, locations, the registry and
the monitor."""
