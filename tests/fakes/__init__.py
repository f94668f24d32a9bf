"""Fakes that behave: simulators the unit tests drive instead of the real thing.

- :mod:`.kernel`: a kernel's network side (links, addresses, routes, bonds, DHCP clients)
  under the network planner.
- :mod:`.guest`: a guest being shut down.
- :mod:`.session`: a client's session under the dispatcher and the event subscriptions.
- :mod:`.clock`: a clock that moves when the test says.
- :mod:`.events`: a subscriber of the event bus that keeps what it is handed, to wait on.
- :mod:`.netstates`: host network states, written by hand.
"""
