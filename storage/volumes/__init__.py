"""Volumes: the ``Volume.*`` service, volume files and chains, and the copy and merge jobs."""
