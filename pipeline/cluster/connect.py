"""Connecting to Ray: the cluster in $RAY_ADDRESS when set, else a local instance of our own."""

import os

import ray


def init_ray() -> bool:
    """Attach to $RAY_ADDRESS (what `ray job submit` sets) or start a local Ray, never attaching by
    accident to another cluster on this machine. True when this call started Ray."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False if address == "local" else None,
             configure_logging=False)
    return True
