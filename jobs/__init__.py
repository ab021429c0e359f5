"""Thin entrypoints, one per job; each runs as `python -m jobs.<name>` or `uniformer <name>`."""
