"""Prefect blocks of the stack: exchange credentials and lake settings (Redis uses prefect-redis)."""
