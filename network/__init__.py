"""Host networking: bridges, addresses, transactions and persistence."""
