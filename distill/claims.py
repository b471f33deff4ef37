"""Claims: which job trains which expert when several jobs write one store (docs/format.md §8.2).

One job (`--nproc`, torchrun) hands its processes the missing experts from a counter in the process
group; separate jobs (two `trajstore experts` commands, on one machine or several) share nothing but
the store, so before training expert i a process claims it there with a create-only write of
`experts/.claims/<id>.<generation>` (a hidden key: readers never list it). Of two processes claiming
one generation exactly one succeeds (an exclusive link on a local file system; `If-None-Match: *` on
S3), so an expert is never trained, and its files never written, by two processes at once. That
matters on an object store, where an expert's files go straight to their final keys (no rename).

A claim holds its owner's host, process id and a heartbeat that a thread renews every HEARTBEAT_S
seconds. A claim is stale, and may be taken over by claiming the next generation, when its process
is gone (same host: the pid no longer exists) or its heartbeat is older than STALE_S (any host;
this assumes clocks agree within a minute or so, as NTP keeps them). So a killed job started again
takes back its experts at once on the same machine and after STALE_S from another.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from collections.abc import Callable

from trajstore.errors import ExistsError, FormatError
from trajstore.format.layout import EXPERTS

PREFIX = f"{EXPERTS}/.claims"
HEARTBEAT_S = 20.0
STALE_S = 120.0


def _key(index: int, generation: int) -> str:
    return f"{PREFIX}/{index:06d}.{generation}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


class Claims:
    """This process's claims on experts of one store (a trajstore Store opened for writing);
    `published(i)` says whether expert i is in the store already (its writer knows where)."""

    def __init__(self, store, published: Callable[[int], bool]):
        self.store, self.published = store, published
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.held: dict[int, int] = {}  # expert -> generation
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        return json.dumps({**self.me, "heartbeat": time.time()}).encode()

    def _generations(self, index: int) -> list[int]:
        prefix = f"{index:06d}."
        found = []
        for name in self.store.listdir(PREFIX):
            tail = name[len(prefix):] if name.startswith(prefix) else ""
            if tail.isdigit():
                found.append(int(tail))
        return sorted(found)

    def holder(self, index: int, generations: list[int] | None = None) -> dict | None:
        """The live claim on expert `index` (its document), or None if there is none or it is stale.
        `generations`: its claims' generations, when the caller has just listed them."""
        generations = self._generations(index) if generations is None else generations
        if not generations:
            return None
        try:
            doc = json.loads(self.store.read_bytes(_key(index, generations[-1])))
        except (FormatError, ValueError):
            return None  # released meanwhile, or unreadable: not a claim anyone can renew
        if not isinstance(doc, dict) or not isinstance(doc.get("heartbeat"), (int, float)):
            return None
        if doc.get("host") == self.me["host"] and isinstance(doc.get("pid"), int) and not _alive(doc["pid"]):
            return None
        return doc if time.time() - doc["heartbeat"] < STALE_S else None

    def acquire(self, index: int) -> bool:
        """Claim expert `index`; False if another live process holds it or it is published already."""
        while True:
            generations = self._generations(index)
            if generations and self.holder(index, generations) is not None:
                return False
            generation = generations[-1] + 1 if generations else 0
            try:
                self.store.create_bytes(_key(index, generation), self._doc())
            except ExistsError:  # another process claimed this generation first: look again
                continue
            with self._lock:
                self.held[index] = generation
            # checked after claiming: an expert published (and released) just before is not trained again
            if self.published(index):
                self.release(index)
                return False
            self._start()
            return True

    def release(self, index: int) -> None:
        """Drop the claim on `index` (after publishing it, or giving it up), older stale ones with it."""
        with self._lock:
            generation = self.held.pop(index, None)
        if generation is None:
            return
        for g in self._generations(index):
            if g <= generation:
                self.store.delete(_key(index, g))

    def release_all(self) -> None:
        for index in list(self.held):
            self.release(index)
        self._stop.set()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="trajstore-claims", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:  # held while writing, so a claim released meanwhile is never written back
                for index, generation in self.held.items():
                    try:
                        self.store.write_bytes(_key(index, generation), self._doc())
                    except Exception:  # a transient network error: the next beat tries again
                        pass
