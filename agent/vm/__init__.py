"""VMs: the ``VM.*`` service, specs and domain XML, policy, state model, locks and hotplug."""
