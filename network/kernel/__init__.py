"""The kernel side of host networking: rtnetlink, the link monitor and DHCP clients."""
