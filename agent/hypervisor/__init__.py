"""The hypervisor seam: the libvirt connection owner and everything that touches libvirt."""
