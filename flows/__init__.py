"""Prefect flows: thin wrappers that read config, run a domain loop and report milestones."""
