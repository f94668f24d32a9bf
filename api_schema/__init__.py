"""The API contract as YAML data files: methods, errors, events and shared types."""
