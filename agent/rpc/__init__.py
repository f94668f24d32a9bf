"""The API edge: JSON-RPC framing, the schema, dispatch, transports, callers, TLS and uplinks."""
