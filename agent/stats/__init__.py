"""Statistics: the sampler of host and VM counters, rates, and Prometheus metrics."""
