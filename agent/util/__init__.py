"""Small helpers every layer may use: asyncio and threads, crash-safe files, safe XML,
log bursts."""
