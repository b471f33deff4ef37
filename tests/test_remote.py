"""Stores at fsspec URLs: the same .ctraj read and written on memory://, file:// and a real S3 API."""

from __future__ import annotations

import fsspec
import pytest
import torch

import trajstore
from helpers import SMALL_LAYERS, random_walk, write_store
from trajstore.stores.location import locate, open_store, parse_storage_options


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAJSTORE_CACHE_DIR", str(tmp_path / "anchor-cache"))


@pytest.fixture
def memory_url(request):
    root = f"memory://t-{request.node.name}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root[len("memory:/"):]):
        fs.rm(root[len("memory:/"):], recursive=True)


def test_memory_round_trip_matches_local(tmp_path, memory_url):
    trajs = [random_walk(seed=s) for s in range(3)]
    local = trajstore.open(write_store(tmp_path / "l.ctraj", trajs, waypoints=(4,)))
    remote = trajstore.open(write_store(f"{memory_url}/r.ctraj", trajs, waypoints=(4,)))
    assert remote.num_experts == 3 and remote.expert_ids == [0, 1, 2]
    for i in range(3):
        assert torch.equal(remote.expert(i).anchor(4)["fc.weight"], trajs[i][4][2])
        for c in (0.0, 2.5, 7.25, 10.0):
            a, b = local.expert(i).at(c, flat=True), remote.expert(i).at(c, flat=True)
            assert torch.equal(a, b)
    remote.verify()


def test_parse_storage_options():
    assert parse_storage_options(["anon=true", "endpoint_url=http://x:1", "client_kwargs.region_name=eu"]) == {
        "anon": True, "endpoint_url": "http://x:1", "client_kwargs": {"region_name": "eu"}}
    with pytest.raises(trajstore.TrajstoreError, match="KEY=VALUE"):
        parse_storage_options(["novalue"])


def test_file_url_is_the_local_path(tmp_path):
    loc = locate(f"file://{tmp_path}/x.ctraj")
    assert not loc.remote and loc.path == tmp_path / "x.ctraj"
    assert type(open_store(loc, mode="w")).__name__ == "DirectoryStore"
