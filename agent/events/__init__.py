"""Events: the in-process bus, the journal, and subscriptions that replay and stream."""
