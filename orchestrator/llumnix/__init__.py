"""The Llumnix-style baseline: when to migrate running requests between replicas."""
