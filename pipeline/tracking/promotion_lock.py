"""The promotion lock: mutual exclusion between promoters of one registered model, kept on the
tracking server (any number of hosts, no other service).

The registry has no compare-and-set, but it refuses to create a registered model whose name exists
(RESOURCE_ALREADY_EXISTS, a unique key in its database), so an atomic create is the lock. The lock
of model NAME is a chain of generations, registered models `NAME.promotion-lock.<g>`; the newest
generation is the lock's state. A promoter takes the lock by creating generation g + 1 once the
newest one, g, is released or expired: of any number of promoters that try, exactly one create
succeeds. The generation holds its owner (a random token, host, pid) and its time to live as tags.

Generations are never reused: the newest is never deleted (release tags it `released`), and a
holder deletes only generations older than its own. So breaking an expired holder is the same
single create as taking a free lock (no delete-then-create that two breakers could interleave),
and "do I still hold it" is one question: is my generation still the newest, unreleased and mine?
The generation number also names the decision record (`promotion/decision-<g>.json`), which is
therefore never overwritten.

Expiry is judged by the server's clock only: a generation is expired when its `creation_timestamp`
is older than its own ttl_s compared with a fresh server timestamp, the `last_updated_timestamp`
the server writes when the clock model `NAME.promotion-clock` is updated. No host's clock is read,
so a host whose clock is off cannot break a live lock early.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

LOCK_TTL_S = 120.0  # a holder does a few writes only; an older lock is a crashed or stalled promoter's
LOCK_INFIX, CLOCK_SUFFIX = ".promotion-lock.", ".promotion-clock"
STOP_ENV = "UNIFORMER_PROMOTE_STOP_AFTER_LOCK"  # tests: the promoter SIGSTOPs itself once it holds the lock


class LockError(RuntimeError):
    """The lock could not be taken in time; the message names the holder and what to do."""


def lock_name(name: str, generation: int) -> str:
    return f"{name}{LOCK_INFIX}{generation}"


def generations(client: MlflowClient, name: str) -> dict:
    """The lock generations of model `name` that exist: {generation: RegisteredModel}."""
    prefix = name + LOCK_INFIX
    found = client.search_registered_models(filter_string=f"name LIKE '{prefix}%'", max_results=1000)
    # LIKE treats `_` in the prefix as a wildcard: keep only exact prefix + number.
    return {int(m.name[len(prefix):]): m for m in found
            if m.name.startswith(prefix) and m.name[len(prefix):].isdigit()}


def server_time_ms(client: MlflowClient, name: str) -> int:
    """The tracking server's clock now: the time it stamps on the clock model when updated (setting a
    tag does not change a registered model's last_updated_timestamp, a description update does)."""
    clock = name + CLOCK_SUFFIX
    note = f"promotion clock of {name} (not a model): promoters read the server's time here"
    try:
        return client.update_registered_model(clock, description=note).last_updated_timestamp
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    with contextlib.suppress(MlflowException):  # another promoter may create it first
        client.create_registered_model(clock, description=note)
    return client.update_registered_model(clock, description=note).last_updated_timestamp


def _describe(model) -> str:
    tags = model.tags
    return f"{tags.get('host', '?')} pid {tags.get('pid', '?')} (generation {model.name.rsplit('.', 1)[-1]})"


def _blocking(client: MlflowClient, name: str, newest) -> str | None:
    """Who holds the lock when `newest` is its newest generation (None: free, released or expired)."""
    if newest is None or "released" in newest.tags:
        return None
    ttl_ms = 1000 * float(newest.tags.get("ttl_s", LOCK_TTL_S))
    age_ms = server_time_ms(client, name) - newest.creation_timestamp
    return None if age_ms > ttl_ms else f"{_describe(newest)}, {age_ms / 1000:.0f} s old by the server's clock"


@dataclass
class PromotionLock:
    client: MlflowClient
    name: str
    generation: int
    token: str

    def held(self) -> bool:
        """Still ours: our generation is the newest, unreleased, and carries our token. A promoter that
        stalled past its ttl learns here that another broke the lock."""
        found = generations(self.client, self.name)
        newest = found.get(max(found, default=0))
        return (newest is not None and newest.name == lock_name(self.name, self.generation)
                and newest.tags.get("owner") == self.token and "released" not in newest.tags)

    def release(self) -> None:
        """Mark our generation released when it is still ours (a broken lock is another's now)."""
        if self.held():
            self.client.set_registered_model_tag(lock_name(self.name, self.generation), "released", "true")


def holder(client: MlflowClient, name: str) -> str | None:
    """Who holds the promotion lock of `name` now, or None when it is free."""
    found = generations(client, name)
    return _blocking(client, name, found.get(max(found, default=0)))


@contextlib.contextmanager
def promotion_lock(client: MlflowClient, name: str, *, timeout_s: float = 300.0,
                   ttl_s: float = LOCK_TTL_S) -> Iterator[PromotionLock]:
    """Hold the promotion lock of `name` (waiting up to `timeout_s`); others may break it after
    `ttl_s` seconds by the server's clock, so check `held()` right before acting on it."""
    token = uuid.uuid4().hex
    owner = {"owner": token, "host": socket.gethostname(), "pid": str(os.getpid()), "ttl_s": f"{ttl_s:g}"}
    deadline = time.monotonic() + timeout_s
    told = False
    while True:
        found = generations(client, name)
        newest = max(found, default=0)
        taken_by = _blocking(client, name, found.get(newest))
        if taken_by is None:
            lock = PromotionLock(client, name, newest + 1, token)
            try:
                client.create_registered_model(lock_name(name, newest + 1), tags=owner,
                                               description=f"promotion lock of {name} (not a model)")
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                taken_by = f"another promoter (it created generation {newest + 1} first)"
            else:
                if lock.held():
                    break
                # Our view was stale: a newer generation exists and ours is a number cleaned up earlier.
                client.delete_registered_model(lock_name(name, newest + 1))
                taken_by = "a newer generation"
        if time.monotonic() > deadline:
            raise LockError(f"the promotion lock of {name!r} stayed taken for {timeout_s:.0f} s (by {taken_by}); "
                            f"retry later: a holder that stopped frees it {ttl_s:g} s after taking it")
        if not told:
            print(f"promote: waiting for the promotion lock of {name!r} (held by {taken_by})", file=sys.stderr,
                  flush=True)
            told = True
        time.sleep(random.uniform(0.2, 1.0))
    if newest and found[newest].tags.get("owner") and "released" not in found[newest].tags:
        print(f"promote: broke the expired promotion lock of {name!r} held by {_describe(found[newest])}",
              file=sys.stderr, flush=True)
    for old in [g for g in found if g < lock.generation]:  # never the newest: numbers are never reused
        with contextlib.suppress(MlflowException):  # another holder may have deleted it already
            client.delete_registered_model(lock_name(name, old))
    try:
        if os.environ.get(STOP_ENV):
            # A known point for tests of a stalled promoter: stop here until SIGCONT.
            print(f"promote: holding the promotion lock of {name!r}; stopping ({STOP_ENV})", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        yield lock
    finally:
        lock.release()
