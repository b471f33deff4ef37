"""Read-only stores over HTTP: a real web server on 127.0.0.1 (aiohttp's static files, as a static
host serves them: byte ranges and HEAD, no directory listing), and the Hugging Face Hub's routing."""

from __future__ import annotations

import asyncio
import json
import sys
import threading

import pytest
import torch

import trajstore
from helpers import SMALL_LAYERS, random_walk, write_store
from trajstore.stores.location import locate

aiohttp_web = pytest.importorskip("aiohttp.web")


class StaticServer:
    """aiohttp serving a folder read-only, recording (method, path, status) of every request."""

    def __init__(self, folder):
        self.requests: list[tuple[str, str, int]] = []

        async def record(request, response):  # the status as sent (a missing file's is set late)
            self.requests.append((request.method, request.path, response.status))

        app = aiohttp_web.Application()
        app.on_response_prepare.append(record)
        app.router.add_static("/", folder, show_index=False)  # no listing, as a bucket website or the Hub
        self.loop = asyncio.new_event_loop()
        self.runner = aiohttp_web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = aiohttp_web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A directory-form and a single-file store on disk, served over HTTP."""
    folder = tmp_path_factory.mktemp("www")
    trajs = [random_walk(seed=s) for s in range(3)]
    write_store(folder / "experts.ctraj", trajs, waypoints=(4,))
    write_store(folder / "one.ctraj", trajs, waypoints=(4,), single_file=True)
    server = StaticServer(folder)
    yield server, folder, trajs
    server.stop()


def _flat(traj, t):
    return torch.cat([x.reshape(-1) for x in traj[t]])


@pytest.mark.parametrize("name", ["experts.ctraj", "one.ctraj"])
def test_open_sample_and_verify_over_http_without_a_listing(served, name, tmp_path):
    server, folder, trajs = served
    server.requests.clear()
    store = trajstore.open(f"{server.url}/{name}", cache_dir=tmp_path / "cache")
    assert store.num_experts == 3 and store.anchor_epochs == (0, 4, 10)
    start, target = store.expert(2).window(4.0, 6.0, flat=True)  # two anchors: bit for bit
    assert torch.equal(start, _flat(trajs[2], 4)) and torch.equal(target, _flat(trajs[2], 10))
    local = trajstore.open(folder / name)
    for c, m in ((0.5, 2.0), (3.25, 4.5)):
        for a, b in zip(store.expert(1).window(c, m, flat=True), local.expert(1).window(c, m, flat=True)):
            assert torch.equal(a, b)
    store.verify()
    # every request named a file of the store (the server has no listing to give); a miss is only the
    # single-file form's absent root zarr.json, asked for once to tell the two forms apart
    served_files = {"/" + str(p.relative_to(folder)) for p in (folder / name).rglob("*") if p.is_file()}
    if (folder / name).is_file():
        served_files = {f"/{name}"}
    misses = [(m, p) for m, p, status in server.requests if status >= 400]
    assert {p for _, p, status in server.requests if status < 400} <= served_files
    assert [p for _, p in misses] == ([] if name == "experts.ctraj" else [f"/{name}/zarr.json"])


def test_cli_reads_over_http_and_refuses_to_write(served, run, tmp_path, legacy_buffer):
    server, folder, _ = served
    url = f"{server.url}/experts.ctraj"
    info = json.loads(run("inspect", url, "--json").output)
    on_disk = sum(p.stat().st_size for p in (folder / "experts.ctraj").rglob("*") if p.is_file())
    assert (info["kind"], info["num_experts"], info["bytes"]) == ("ctraj", 3, on_disk)
    assert "OK:" in run("verify", url, "--quiet").output
    directory, _ = legacy_buffer
    bad = run("convert", directory, f"{server.url}/new.ctraj", "--quiet", ok=False)
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert bad.output.strip().count("\n") == 0 and "can only be read" in bad.output
    with pytest.raises(trajstore.TrajstoreError, match="can only be read"):
        trajstore.create(f"{server.url}/new.ctraj", SMALL_LAYERS, 11)
    with pytest.raises(trajstore.TrajstoreError, match="can only be read"):
        trajstore.create(url, SMALL_LAYERS, 11, overwrite=True)
    assert not any(m not in ("GET", "HEAD") for m, _, _ in server.requests)


def test_hf_urls_go_through_huggingface_hub(monkeypatch):
    """No network in the tests: only that hf:// reaches huggingface_hub's filesystem, and that without
    the package the user is told in one line what to install."""
    registry = sys.modules["fsspec.registry"]._registry
    monkeypatch.delitem(registry, "hf", raising=False)  # fsspec keeps the class once imported
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(trajstore.TrajstoreError) as missing:
        trajstore.open("hf://datasets/org/name/experts.ctraj")
    assert str(missing.value).count("\n") == 0 and "pip install huggingface_hub" in str(missing.value)
    monkeypatch.undo()
    hub = pytest.importorskip("huggingface_hub")
    loc = locate("hf://datasets/org/name/experts.ctraj")
    assert isinstance(loc.fs, hub.HfFileSystem) and loc.fs_path == "datasets/org/name/experts.ctraj"
