"""Fakes that behave: simulators the unit tests drive instead of the real thing."""
