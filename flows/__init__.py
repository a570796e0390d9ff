"""Prefect flows that publish checkpoints and sync inference servers (not built yet: issue 5)."""
