"""The host: the ``Host.*`` service, the host's identity and host device events."""
