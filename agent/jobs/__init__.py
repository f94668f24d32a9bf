"""Jobs: long operations in the background, their records and the ``Job.*`` service."""
