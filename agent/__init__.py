"""virtnode: a per-host virtualization agent with a JSON-RPC 2.0 API."""

__version__ = "0.1.0"
