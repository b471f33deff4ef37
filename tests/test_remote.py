"""Stores at fsspec URLs: the same .ctraj read and written on a real S3 API (moto's server on
127.0.0.1), on memory:// and on a local file:// URL."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

import trajstore
from trajstore.archive import open_archive, pack
from helpers import KILL_AT_LOCAL_SWAP, SMALL_LAYERS, random_walk, run_until_killed, write_store
from trajstore.stores.location import Location, locate, open_store, parse_storage_options
from trajstore.stores.remote import FsspecStore
from trajstore.tools.convert import open_source

REPO = Path(__file__).resolve().parent.parent
TESTS = str(Path(__file__).parent)


class Backend:
    def __init__(self, name: str, root: str, options: dict, fs, multiprocess: bool):
        self.name, self.root, self.options, self.fs, self.multiprocess = name, root, options, fs, multiprocess

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def path(self, name: str) -> str:
        """The fsspec path of a store (for changing its bytes behind trajstore's back)."""
        loc = locate(self.url(name), self.options)
        return str(loc.path) if loc.path is not None else loc.fs_path

    @property
    def cli_options(self) -> list[str]:
        return [f"--storage-option={k}={v}" for k, v in self.options.items()]


@pytest.fixture(params=["s3", "memory", "file"])
def backend(request, tmp_path, monkeypatch):
    monkeypatch.setenv("TRAJSTORE_CACHE_DIR", str(tmp_path / "anchor-cache"))
    run = uuid.uuid4().hex[:8]
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_server")
        options = {"endpoint_url": endpoint}
        yield Backend("s3", f"s3://trajstore-tests/{run}", options, fsspec.filesystem("s3", **options), True)
    elif request.param == "memory":
        fs = fsspec.filesystem("memory")
        yield Backend("memory", f"memory://{run}", {}, fs, False)
        if fs.exists(f"/{run}"):
            fs.rm(f"/{run}", recursive=True)
    else:
        yield Backend("file", f"file://{tmp_path}/{run}", {}, fsspec.filesystem("file"), False)


def test_convert_open_sample_inspect_verify(backend, legacy_buffer, tmp_path, run):
    directory, trajs = legacy_buffer
    url = backend.url("experts.ctraj")
    out = run("convert", directory, url, "--waypoints", "3,6", "--quiet", *backend.cli_options).output
    assert "5 experts x 11 timesteps" in out
    local = tmp_path / "local.ctraj"
    run("convert", directory, local, "--waypoints", "3,6", "--quiet")
    remote, near = trajstore.open(url, storage_options=backend.options), trajstore.open(local)
    assert (remote.num_experts, remote.anchor_epochs) == (5, (0, 3, 6, 10))
    assert remote.nbytes == near.nbytes
    for i in range(5):  # each anchor is the legacy timestep itself, bit for bit
        assert torch.equal(remote.expert(i).anchor(6)["classifier.bias"], trajs[i][6][-1])
        for c, m in ((0.0, 2.0), (2.75, 3.5), (9.5, 1.0)):
            for a, b in zip(remote.expert(i).window(c, m, flat=True), near.expert(i).window(c, m, flat=True)):
                assert torch.equal(a, b)
    info = json.loads(run("inspect", url, "--json", *backend.cli_options).output)
    assert (info["kind"], info["num_experts"], info["bytes"]) == ("ctraj", 5, near.nbytes)
    assert "OK:" in run("verify", url, *backend.cli_options).output
    again = run("convert", directory, url, "--quiet", *backend.cli_options, ok=False)
    assert again.exit_code == 1 and "already exists" in again.output


def test_verify_on_a_remote_store_checks_every_checksum(backend, run):
    url = backend.url("v.ctraj")
    write_store(url, [random_walk(seed=s) for s in range(2)], waypoints=(4,), storage_options=backend.options)
    assert "OK:" in run("verify", url, *backend.cli_options).output
    chunk = f"{backend.path('v.ctraj')}/experts/000001/step_norms/c/0/0"  # never read by sampling
    data = bytearray(backend.fs.cat_file(chunk))
    data[-1] ^= 0x01
    backend.fs.pipe_file(chunk, bytes(data))
    bad = run("verify", url, *backend.cli_options, ok=False)
    assert bad.exit_code == 1 and "sha256 mismatch" in bad.output and "000001/step_norms/c/0/0" in bad.output
    assert "Traceback" not in bad.output


def test_verify_fetches_every_anchor_again_and_names_a_flipped_one(backend, tmp_path, run):
    """A byte of an anchor flipped on the server after a good copy reached the disk cache: verify
    reads the server's bytes, not the cache's, and fails with one line naming the file."""
    url = backend.url("flip.ctraj")
    write_store(url, [random_walk(seed=s) for s in range(2)], waypoints=(4,), storage_options=backend.options)
    store = trajstore.open(url, storage_options=backend.options, cache_dir=tmp_path / "cache")
    store.expert(1).window(1.0, 2.0)  # anchors 0 and 4 of expert 1, now in the disk cache
    anchor = f"{backend.path('flip.ctraj')}/experts/000001/anchor_0004.safetensors"
    data = bytearray(backend.fs.cat_file(anchor))
    data[len(data) // 2] ^= 0x10  # inside the tensor data: still a readable safetensors file
    backend.fs.pipe_file(anchor, bytes(data))
    with pytest.raises(trajstore.ChecksumError, match="000001/anchor_0004.safetensors"):
        store.verify()
    bad = run("verify", url, "--quiet", *backend.cli_options, ok=False)
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    assert "sha256 mismatch" in bad.output and "experts/000001/anchor_0004.safetensors" in bad.output


class Counting(FsspecStore):
    """Records every key read, to check what the reader fetches."""

    reads: list

    def read_bytes(self, key):
        self.reads.append(key)
        return super().read_bytes(key)

    def read_range(self, key, start, end):
        self.reads.append(key)
        return super().read_range(key, start, end)


def test_reading_is_lazy_and_anchors_come_from_a_verified_disk_cache(backend, tmp_path, monkeypatch):
    if backend.name == "file":
        pytest.skip("file:// is a local path: memory-mapped, nothing to fetch")
    url = backend.url("lazy.ctraj")
    trajs = [random_walk(seed=s) for s in range(3)]
    write_store(url, trajs, waypoints=(4,), storage_options=backend.options)
    reads: list = []
    monkeypatch.setattr(Counting, "reads", reads, raising=False)
    monkeypatch.setattr("trajstore.stores.location.FsspecStore", Counting, raising=False)
    import trajstore.stores.remote as remote

    monkeypatch.setattr(remote, "FsspecStore", Counting)
    cache = tmp_path / "cache"
    store = trajstore.open(url, storage_options=backend.options, cache_dir=cache)
    assert reads == ["zarr.json"]  # opening reads the metadata only
    start, target = store.expert(1).window(1.5, 2.0, flat=True)  # both in piece [0, 4]
    d = "experts/000001"
    assert sorted(reads[1:]) == sorted([f"{d}/zarr.json", f"{d}/beta/zarr.json", f"{d}/beta/c/0/0",
                                        f"{d}/anchor_0000.safetensors", f"{d}/anchor_0004.safetensors"])
    want = torch.cat([t.reshape(-1) for t in trajs[1][0]]).lerp(torch.cat([t.reshape(-1) for t in trajs[1][4]]),
                                                                 0.0)  # shape reference
    assert start.shape == want.shape
    reads.clear()
    store.expert(1).window(2.5, 1.0, flat=True)
    assert reads == []  # the expert's arrays and anchors are held
    again = trajstore.open(url, storage_options=backend.options, cache_dir=cache)
    reads.clear()
    a, b = again.expert(1).window(1.5, 2.0, flat=True)
    assert not any("anchor" in k for k in reads)  # from the disk cache
    assert torch.equal(a, start) and torch.equal(b, target)
    # a damaged cache entry is noticed (sha256 against the manifest) and fetched again
    entry = next(p for p in cache.glob("??/*"))
    entry.write_bytes(b"\0" * entry.stat().st_size)
    third = trajstore.open(url, storage_options=backend.options, cache_dir=cache)
    reads.clear()
    for e in range(3):
        for c in (0.0, 4.0, 10.0):
            torch.testing.assert_close(third.expert(e).at(c, flat=True),
                                       torch.cat([t.reshape(-1) for t in trajs[e][int(c)]]), rtol=0, atol=0)
    assert sum("anchor" in k for k in reads) == 3 * 3 - 2 + 1  # all but the two cached, and the damaged one


def test_disk_cache_is_bounded(backend, tmp_path):
    if backend.name == "file":
        pytest.skip("file:// is a local path: no cache")
    url = backend.url("bounded.ctraj")
    write_store(url, [random_walk(seed=s) for s in range(3)], waypoints=(4,), storage_options=backend.options)
    files = open_store(url, backend.options)
    limit = 3 * files.size("experts/000000/anchor_0000.safetensors")
    cache = tmp_path / "small"
    store = trajstore.open(url, storage_options=backend.options, cache_dir=cache, disk_cache_bytes=limit)
    used = []
    for e in range(3):
        for c in (0.0, 4.0, 10.0):
            store.expert(e).at(c)
            used.append(store.expert(e)._manifest()[f"anchor_{int(c):04d}.safetensors"])
    held = {p.name: p.stat().st_size for p in cache.glob("??/*")}
    assert sum(held.values()) <= limit and len(held) >= 2
    assert used[-1] in held and used[0] not in held  # the least recently used went first


WRITE_RANK = textwrap.dedent("""
    import json, sys, trajstore
    sys.path.insert(0, {tests!r})
    from helpers import SMALL_LAYERS, random_walk
    rank, url, options = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    with trajstore.create(url, SMALL_LAYERS, 11, waypoints=(4,), append=True, storage_options=options) as w:
        for i in range(3):
            w.write_expert(random_walk(seed=10 * rank + i), index=3 * rank + i)
""")


def test_concurrent_writers_share_one_store(backend):
    """Three writers add experts to one store at once: on S3 two other processes and a thread here
    (the local form's processes are tested in test_writer.py); elsewhere three threads."""
    url = backend.url("shared.ctraj")
    errors = []

    def write(rank):
        try:
            with trajstore.create(url, SMALL_LAYERS, 11, waypoints=(4,), append=True,
                                  storage_options=backend.options) as w:
                for i in range(3):
                    w.write_expert(random_walk(seed=10 * rank + i), index=3 * rank + i)
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    procs = []
    if backend.multiprocess:
        code = WRITE_RANK.format(tests=TESTS)
        procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), url, json.dumps(backend.options)],
                                  cwd=REPO) for rank in (1, 2)]
    threads = [threading.Thread(target=write, args=(rank,)) for rank in ([0] if procs else [0, 1, 2])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait() for p in procs] == [0] * len(procs) and errors == []
    store = trajstore.open(url, storage_options=backend.options)
    assert store.expert_ids == list(range(9))
    store.verify()
    want = random_walk(seed=21)  # rank 2, i = 1 -> expert 7
    assert torch.equal(store.expert(7).anchor(4)["conv.weight"], want[4][0])
    with pytest.raises(trajstore.ExistsError, match="expert 7 already exists"):
        with trajstore.create(url, SMALL_LAYERS, 11, waypoints=(4,), append=True,
                              storage_options=backend.options) as w:
            w.write_expert(random_walk(seed=99), index=7)


def _race(monkeypatch, url: str, answered: int, other):
    """Make `other()` (another process's work at url) run whole right after the `answered`-th time this
    process asks whether url exists and hears "no"; returns the list that then holds other()'s result."""
    real, asks, others = Location.exists, [], []

    def exists(location):
        answer = real(location)
        if location.target == url and not answer and not others:
            asks.append(answer)
            if len(asks) == answered:
                others.append(other())
        return answer

    monkeypatch.setattr(Location, "exists", exists)
    return others


@pytest.mark.parametrize("answered", [1, 2])
def test_a_writer_starting_while_another_creates_the_store_joins_it(backend, monkeypatch, answered):
    """Two appending writers start one store: B asks whether the store exists and hears "no"; A then
    creates it before B goes on. B must join A's store, never treat it as one to replace. (The flaky
    `test_concurrent_writers_share_one_store[file]`: a writer that asked three times could hear "no",
    "no", "yes" and take the replace path, so its close renamed the live store away and deleted it
    under the other writers, whose temporary files vanished.) `answered`: after which of B's asks A
    creates the store (an ask that does not happen leaves A to start after B)."""
    url = backend.url("raced.ctraj")
    opts = dict(storage_options=backend.options)
    others = _race(monkeypatch, url, answered,
                   lambda: trajstore.create(url, SMALL_LAYERS, 11, waypoints=(4,), append=True, **opts))
    b = trajstore.create(url, SMALL_LAYERS, 11, waypoints=(4,), append=True, **opts)
    a = others[0] if others else trajstore.create(url, SMALL_LAYERS, 11, waypoints=(4,), append=True, **opts)
    trajs = [random_walk(seed=40 + i) for i in range(3)]
    a.write_expert(trajs[0], index=0)
    b.write_expert(trajs[1], index=1)
    b.close()  # had B taken the replace path, this would swap A's store (and expert 0) out
    a.write_expert(trajs[2], index=2)
    a.close()
    store = trajstore.open(url, **opts)
    assert store.expert_ids == [0, 1, 2]
    store.verify()
    for i, traj in enumerate(trajs):
        assert torch.equal(store.expert(i).at(10.0, flat=True), _flat(traj, 10))


@pytest.mark.parametrize("who", ["creator", "joiner"])
def test_a_failed_writer_leaves_the_store_others_are_writing(backend, monkeypatch, who):
    """A creates a store and B joins it; before any expert is published one of them fails (an exception
    in its `with` block) while the other is between two files of its first expert. The failed writer
    must not remove the store (it once deleted it whenever no expert was published yet: the other
    writer's next file then found its directory gone)."""
    url = backend.url("shared-fail.ctraj")
    opts = dict(storage_options=backend.options)
    a = trajstore.create(url, SMALL_LAYERS, 11, waypoints=(4,), append=True, **opts)
    b = trajstore.create(url, SMALL_LAYERS, 11, waypoints=(4,), append=True, **opts)
    failing, going = (a, b) if who == "creator" else (b, a)
    real, failed = type(going._store).write_bytes, []

    def write_bytes(store, key, data):
        real(store, key, data)
        if store is going._store and "anchor_" in key and not failed:  # between two files of the expert
            with pytest.raises(RuntimeError, match="training diverged"):
                with failing:
                    failed.append(key)
                    raise RuntimeError("training diverged")

    monkeypatch.setattr(type(going._store), "write_bytes", write_bytes)
    traj = random_walk(seed=50)
    going.write_expert(traj, index=1)
    assert failed
    going.close()
    store = trajstore.open(url, **opts)
    assert store.expert_ids == [1]
    store.verify()
    assert torch.equal(store.expert(0).at(10.0, flat=True), _flat(traj, 10))  # position 0: the expert of id 1


def test_a_failed_writer_alone_removes_the_store_it_created(backend):
    """Nobody else wrote to it: a failed new store is removed, as before."""
    url = backend.url("alone.ctraj")
    with pytest.raises(RuntimeError, match="training diverged"):
        with trajstore.create(url, SMALL_LAYERS, 11, waypoints=(4,), append=True,
                              storage_options=backend.options):
            raise RuntimeError("training diverged")
    assert not locate(url, backend.options).exists()


WRITE_FOREVER = textwrap.dedent("""
    import json, sys, trajstore
    sys.path.insert(0, {tests!r})
    from helpers import SMALL_LAYERS, random_walk
    url, options = sys.argv[1], json.loads(sys.argv[2])
    traj = random_walk(num_timesteps=11)
    with trajstore.create(url, SMALL_LAYERS, 11, storage_options=options) as w:
        w.write_expert(traj)
        print("first expert written", flush=True)
        while True:
            w.write_expert(traj)
""")


def test_interrupted_write_leaves_nothing_that_opens(backend):
    """A writer killed mid-expert (a real SIGKILL on S3; the local form's is in test_writer.py)."""
    url = backend.url("killed.ctraj")
    if backend.name == "s3":
        code = WRITE_FOREVER.format(tests=TESTS)
        proc = subprocess.Popen([sys.executable, "-c", code, url, json.dumps(backend.options)],
                                stdout=subprocess.PIPE, cwd=REPO)
        assert proc.stdout.readline().strip() == b"first expert written"
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    else:  # what a killed writer leaves: an unfinished root, an expert's files without their manifest
        w = trajstore.create(url, SMALL_LAYERS, 11, storage_options=backend.options)
        w.write_expert(random_walk())
        w._store.write_bytes("experts/000001/anchor_0000.safetensors", b"half an expert")
    with pytest.raises(trajstore.FormatError, match="unfinished write"):
        trajstore.open(url, storage_options=backend.options)
    with trajstore.create(url, SMALL_LAYERS, 11, append=True, storage_options=backend.options) as w:
        done = w.existing_experts()
        assert done[0] == 0
    store = trajstore.open(url, storage_options=backend.options)  # finished experts survive, each whole
    assert store.num_experts == len(done)
    store.verify()


def _keys(backend, name: str) -> list[str]:
    root = backend.path(name)
    return sorted(p[len(root) + 1:] for p in backend.fs.find(root))


def _flat(traj, t):
    return torch.cat([x.reshape(-1) for x in traj[t]])


def test_replace_keeps_the_old_store_whole_until_close(backend, tmp_path):
    """overwrite=True: until the new store is closed, readers open the old one, whole and verified;
    on close they open the new one, and the old one's keys are gone."""
    url = backend.url("replaced.ctraj")
    old = [random_walk(seed=s) for s in range(2)]
    write_store(url, old, waypoints=(4,), storage_options=backend.options)
    new = [random_walk(seed=10 + s) for s in range(3)]
    w = trajstore.create(url, SMALL_LAYERS, 11, waypoints=(4,), overwrite=True, storage_options=backend.options)
    for traj in new[:2]:
        w.write_expert(traj)
    during = trajstore.open(url, storage_options=backend.options, cache_dir=tmp_path / "c1")
    assert during.num_experts == 2
    during.verify()
    for i in range(2):
        assert torch.equal(during.expert(i).at(4.0, flat=True), _flat(old[i], 4))
    w.write_expert(new[2])
    w.close()
    after = trajstore.open(url, storage_options=backend.options, cache_dir=tmp_path / "c2")
    assert after.num_experts == 3
    after.verify()
    for i in range(3):
        assert torch.equal(after.expert(i).at(10.0, flat=True), _flat(new[i], 10))
    groups = {k.split("/", 1)[0] for k in _keys(backend, "replaced.ctraj")} - {"zarr.json"}
    if backend.name == "file":  # a local path: built beside it and renamed into place
        assert groups == {"experts"}
    else:  # no rename: one new experts group, named by the root; the old group is deleted
        assert len(groups) == 1 and groups != {"experts"}
        assert groups == {after.meta.experts_group}
    # replacing again (and appending to the result) keeps working under whatever group the root names
    write_store(url, old[:1], waypoints=(4,), overwrite=True, storage_options=backend.options)
    write_store(url, old[1:], waypoints=(4,), append=True, storage_options=backend.options)
    again = trajstore.open(url, storage_options=backend.options, cache_dir=tmp_path / "c3")
    assert again.num_experts == 2 and torch.equal(again.expert(1).at(4.0, flat=True), _flat(old[1], 4))
    again.verify()
    assert len({k.split("/", 1)[0] for k in _keys(backend, "replaced.ctraj")} - {"zarr.json"}) == 1


REPLACE_UNTIL_KILLED = textwrap.dedent("""
    import json
    import trajstore
    from helpers import SMALL_LAYERS, random_walk
    url, options = {url!r}, json.loads({options!r})
    w = trajstore.create(url, SMALL_LAYERS, 11, waypoints=(4,), overwrite=True, storage_options=options)
    w.write_expert(random_walk(seed=20))
    # the second expert dies after its files are written, before its manifest publishes it
    type(w._store).publish = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    w.write_expert(random_walk(seed=21))
""")


def test_killed_replace_leaves_the_old_store_valid(backend, tmp_path):
    """A replacing writer SIGKILLed mid-expert (a real process on S3 and file://; on memory://, which
    one process holds, a writer abandoned at the same point): the old store opens, whole."""
    url = backend.url("kept.ctraj")
    old = [random_walk(seed=s) for s in range(2)]
    write_store(url, old, waypoints=(4,), storage_options=backend.options)
    before = _keys(backend, "kept.ctraj")
    if backend.name == "memory":
        w = trajstore.create(url, SMALL_LAYERS, 11, waypoints=(4,), overwrite=True, storage_options=backend.options)
        w.write_expert(random_walk(seed=20))
        w._store.write_bytes(f"{w.meta.experts_group}/000001/anchor_0000.safetensors", b"half an expert")
    else:
        run_until_killed(REPLACE_UNTIL_KILLED.format(url=url, options=json.dumps(backend.options)))
    store = trajstore.open(url, storage_options=backend.options, cache_dir=tmp_path / "c")
    assert store.num_experts == 2
    store.verify()
    for i in range(2):
        assert torch.equal(store.expert(i).at(10.0, flat=True), _flat(old[i], 10))
    if backend.name != "file":  # the killed writer got as far as a published expert, under keys no root names
        left = sorted(set(_keys(backend, "kept.ctraj")) - set(before))
        assert any(k.endswith("/000000/zarr.json") for k in left) and not any(k.startswith("experts/") for k in left)
    write_store(url, old[:1], waypoints=(4,), overwrite=True, storage_options=backend.options)  # a later replace
    assert trajstore.open(url, storage_options=backend.options).num_experts == 1
    if backend.name != "file":  # ... removes what the killed one left
        assert len({k.split("/", 1)[0] for k in _keys(backend, "kept.ctraj")} - {"zarr.json"}) == 1


def test_a_failed_convert_over_a_store_leaves_it_whole(backend, legacy_buffer, tmp_path, run):
    """`convert --force` whose source turns out bad halfway (a NaN in its 4th trajectory): exit 1, and
    the store it was to replace opens and verifies as before."""
    directory, trajs = legacy_buffer
    url = backend.url("kept.ctraj")
    run("convert", directory, url, "--waypoints", "3,6", "--quiet", *backend.cli_options)
    bad = tmp_path / "bad" / "CIFAR10_NO_ZCA" / "ConvNet"
    bad.mkdir(parents=True)
    poisoned = [[[t.clone() for t in step] for step in traj] for traj in trajs]
    poisoned[3][5][0].view(-1)[0] = float("nan")
    for n in range(3):
        torch.save(poisoned[2 * n:2 * n + 2], bad / f"replay_buffer_{n}.pt")
    failed = run("convert", bad, url, "--force", "--quiet", *backend.cli_options, ok=False)
    assert failed.exit_code == 1 and "NaN" in failed.output
    store = trajstore.open(url, storage_options=backend.options, cache_dir=tmp_path / "c")
    assert store.num_experts == 5
    store.verify()
    assert torch.equal(store.expert(3).anchor(6)["classifier.bias"], trajs[3][6][-1])


@pytest.mark.parametrize("answered", [1, 2, 3])
def test_a_convert_never_joins_or_removes_a_store_another_process_starts_meanwhile(backend, legacy_buffer,
                                                                                  monkeypatch, answered):
    """Another process converts to the same URL while this convert runs: after this one's `answered`-th
    question "is anything there?" was answered "no". This convert fails with one ExistsError, having
    neither added its experts to the other's store (joined it) nor deleted it on the way out."""
    from trajstore.tools.convert import convert

    if backend.name == "file":
        pytest.skip("file:// is a local path: built aside, then renamed, which fails if the output appeared")
    directory, trajs = legacy_buffer
    url = backend.url("raced.ctraj")
    others = _race(monkeypatch, url, answered, lambda: convert(directory, url, waypoints=(3, 6), progress=False,
                                                               storage_options=backend.options))
    with pytest.raises(trajstore.ExistsError):
        convert(directory, url, waypoints=(3, 6), progress=False, storage_options=backend.options)
    assert others, "the race was not set up"
    monkeypatch.undo()
    store = trajstore.open(url, storage_options=backend.options)
    assert store.num_experts == 5
    store.verify()
    assert torch.equal(store.expert(4).anchor(6)["classifier.bias"], trajs[4][6][-1])


def test_single_file_form_at_a_url(backend):
    url = backend.url("one.ctraj")
    trajs = [random_walk(seed=s) for s in range(2)]
    write_store(url, trajs, waypoints=(4,), single_file=True, storage_options=backend.options)
    store = trajstore.open(url, storage_options=backend.options)
    assert type(store._store).__name__ == "ZipFileStore"
    assert torch.equal(store.expert(1).anchor(4)["fc.bias"], trajs[1][4][3])
    store.verify()
    with pytest.raises(trajstore.ExistsError):
        write_store(url, trajs, single_file=True, storage_options=backend.options)
    write_store(url, trajs[:1], single_file=True, overwrite=True, storage_options=backend.options)  # one PUT
    assert trajstore.open(url, storage_options=backend.options).num_experts == 1
    if backend.name != "file":  # a change of form cannot switch in one step at a URL: refused, nothing touched
        with pytest.raises(trajstore.ExistsError, match="holds a single-file .ctraj.*same form"):
            write_store(url, trajs, overwrite=True, storage_options=backend.options)
        assert trajstore.open(url, storage_options=backend.options).num_experts == 1


def test_pack_unpack_at_a_url(backend, legacy_buffer, tmp_path, run):
    directory, trajs = legacy_buffer
    url = backend.url("full.zarr")
    run("pack", directory, url, "--quiet", *backend.cli_options)
    assert "archive" in run("verify", url, *backend.cli_options).output
    run("unpack", url, tmp_path / "back", "--per-file", "5", "--quiet", *backend.cli_options)
    restored = torch.load(tmp_path / "back" / "replay_buffer_0.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(restored[3][7], trajs[3][7]))


PACK_UNTIL_KILLED = textwrap.dedent("""
    import json
    import trajstore.archive
    from trajstore.stores.remote import FsspecStore
    src, url, options, when, layers = {src!r}, {url!r}, json.loads({options!r}), {when!r}, {layers!r}
    packing = sys.modules["trajstore.archive.pack"]  # the module, which the package's `pack` function hides
    die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    if when == "writing":  # the third expert's first tensors: two experts are written, three are not
        real_bits, calls = packing._bits, []
        def bits(tensors):
            calls.append(1)
            if len(calls) == 2 * layers + 1:
                die()
            return real_bits(tensors)
        packing._bits = bits
    else:  # the switch: the new archive is in place, the old one not yet deleted (a local path: KILL_AT_LOCAL_SWAP)
        FsspecStore._remove = die  # at a URL: the old keys' deletion, after the root's PUT
    packing.pack(src, url, overwrite=True, progress=False, storage_options=options)
    sys.exit(3)  # not killed: the point named was never reached
""")


def _same_archive(url, options, trajs):
    archive = open_archive(url, storage_options=options)
    archive.verify()
    assert archive.num_experts == len(trajs)
    for i in (0, len(trajs) - 1):
        assert all(torch.equal(a, b) for a, b in zip(archive.trajectory(i)[7], trajs[i][7]))


@pytest.mark.parametrize("when", ["writing", "switch"])
def test_pack_force_killed_never_leaves_nothing(backend, legacy_buffer, legacy_write, legacy_layers, tmp_path,
                                                monkeypatch, when):
    """`pack --force` over an archive, SIGKILLed while writing the new one (the old one still opens,
    whole, with its own data) or at the switch (the new one opens, whole). On memory://, which one
    process holds, the write fails with an exception instead of a kill."""
    if backend.name == "memory" and when == "switch":
        pytest.skip("memory:// lives in this process: there is no writer process to kill")
    directory, old = legacy_buffer
    new_dir = tmp_path / "new" / "CIFAR10_NO_ZCA" / "ConvNet"
    new = legacy_write(new_dir, 4, per_file=2, seed=100)
    url = backend.url("full.zarr")
    pack(directory, url, progress=False, storage_options=backend.options)
    if backend.name == "memory":
        packing = sys.modules["trajstore.archive.pack"]

        def fail(tensors):
            raise RuntimeError("interrupted")

        monkeypatch.setattr(packing, "_bits", fail)
        with pytest.raises(RuntimeError, match="interrupted"):
            pack(new_dir, url, overwrite=True, progress=False, storage_options=backend.options)
        monkeypatch.undo()
    else:
        code = PACK_UNTIL_KILLED.format(src=str(new_dir), url=url, options=json.dumps(backend.options), when=when,
                                        layers=len(legacy_layers))
        run_until_killed((KILL_AT_LOCAL_SWAP if when == "switch" else "") + code)
    _same_archive(url, backend.options, old if when == "writing" else new)
    if when == "switch":
        return
    pack(new_dir, url, overwrite=True, progress=False, storage_options=backend.options)  # a later replace
    _same_archive(url, backend.options, new)
    if backend.name != "file":  # ... leaves one root and the one group it names, nothing of the old or killed ones
        groups = {k.split("/", 1)[0] for k in _keys(backend, "full.zarr")}
        assert len(groups - {"zarr.json"}) == 1 and groups - {"zarr.json"} != {"params"}


def test_parse_storage_options():
    assert parse_storage_options(["anon=true", "endpoint_url=http://x:1", "client_kwargs.region_name=eu"]) == {
        "anon": True, "endpoint_url": "http://x:1", "client_kwargs": {"region_name": "eu"}}
    with pytest.raises(trajstore.TrajstoreError, match="KEY=VALUE"):
        parse_storage_options(["novalue"])


def test_what_a_target_is(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    assert locate(directory).kind == "legacy"
    assert locate(tmp_path / "nothing").kind == "missing"
    loc = locate(f"file://{tmp_path}/x.ctraj")
    assert not loc.remote and loc.path == tmp_path / "x.ctraj"
    assert locate("memory://somewhere/x.ctraj").remote
    with pytest.raises(trajstore.FormatError, match="memory://nowhere/buffers: no such buffer file or directory"):
        open_source("memory://nowhere/buffers")


def test_https_is_read_only():
    store = open_store("https://example.invalid/x.ctraj", mode="w")
    with pytest.raises(trajstore.TrajstoreError, match="can only be read"):
        store.write_bytes("zarr.json", b"{}")


def test_bad_urls_are_one_clear_error(run):
    with pytest.raises(trajstore.FormatError, match="no such .ctraj"):
        trajstore.open("memory://nothing-here/x.ctraj")
    with pytest.raises(trajstore.TrajstoreError, match="cannot open this URL"):
        trajstore.open("nosuchprotocol://bucket/x.ctraj")
    bad = run("inspect", "memory://nothing-here/x.ctraj", ok=False)
    assert bad.exit_code == 1 and "Traceback" not in bad.output and "memory://nothing-here/x.ctraj" in bad.output
    bad = run("convert", "memory://nothing-here/buffers", "memory://out/x.ctraj", ok=False)
    assert bad.exit_code == 1 and "memory://nothing-here/buffers: no such buffer file or directory" in bad.output


def test_a_store_removed_under_its_writer_is_an_error_not_started_again(tmp_path):
    """Someone deletes a local store while its writer works: the writer's next file fails with one
    error, and no store missing its metadata and earlier files is started again at that path."""
    path = tmp_path / "gone.ctraj"
    w = trajstore.create(path, SMALL_LAYERS, 11, waypoints=(4,))
    shutil.rmtree(path)
    with pytest.raises(trajstore.FormatError, match="removed while this writer was writing"):
        w.write_expert(random_walk())
    assert not path.exists()
