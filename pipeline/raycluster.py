"""Connecting to Ray: the cluster in $RAY_ADDRESS when set, else a local instance of our own."""

import os

import ray


def init_ray() -> None:
    """Attach to $RAY_ADDRESS (what `ray job submit` sets) or start a local Ray; never attach by
    accident to some other cluster running on this machine."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, log_to_driver=True, configure_logging=False)
