"""The training commands and the archive on remote stores: `trajstore experts`, `distill`, `pack` and
`unpack` with s3:// URLs (moto's real S3 server on 127.0.0.1, tests/conftest.py) and memory:// URLs.

Expert training is tiny (ConvNetW8, one epoch, the embedded digits) and every comparison is with the
same command run on a local path, bit for bit: one torch thread everywhere (OMP_NUM_THREADS for the
processes the commands start), since CPU kernels sum in an order that depends on the thread count.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import trajstore
import trajstore.archive
from trajstore.cli.options import no_log
from trajstore.distill import claims as claims_module
from trajstore.distill.claims import Claims
from trajstore.distill.experts import train_experts
from trajstore.distill.run import open_experts
from trajstore.stores.location import open_store
from trajstore.stores.remote import FsspecStore

REPO = Path(__file__).resolve().parent.parent
EXPERTS = ["--model", "ConvNetW8", "--epochs", "1", "--waypoints", ""]


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # for the processes `--nproc` and the tests start
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    """4 experts trained here, on a local path, as `trajstore experts ... EXPERTS` trains them."""
    out = tmp_path_factory.mktemp("ref") / "e.ctraj"
    train_experts(out, model="ConvNetW8", epochs=1, num_experts=4, progress=False, log=no_log)
    return trajstore.open(out)


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch):
    """(a fresh s3:// prefix, the CLI's storage options, Python's storage_options)."""
    monkeypatch.setenv("TRAJSTORE_CACHE_DIR", str(tmp_path / "anchor-cache"))
    options = {"endpoint_url": s3_server}
    return f"s3://trajstore-tests/{uuid.uuid4().hex[:8]}", ["-S", f"endpoint_url={s3_server}"], options


def same_experts(store, reference, ids) -> None:
    """Expert i of `store` is expert i of `reference`, bit for bit (anchors, betas, step norms)."""
    for i in ids:
        a, b = store.expert(i), reference.expert(i)
        for epoch in reference.anchor_epochs:
            assert all(torch.equal(x, y) for x, y in zip(a.anchor(epoch).values(), b.anchor(epoch).values())), i
        assert (a.beta == b.beta).all() and (a.step_norms == b.step_norms).all()


def cli_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trajstore", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def s3_experts(s3_server, one_thread, tmp_path_factory):
    """An s3 store made by three jobs: expert 0 by one here; then, while this process holds a claim on
    expert 2 (another job training it), `trajstore experts --num-experts 4 --nproc 2`, which trains
    1 and 3 on two processes and leaves 2; then a job here that trains 2. (Its URL, options, expert 0's
    provenance, the command's output, the lines the last job logged.)"""
    url = f"s3://trajstore-tests/{uuid.uuid4().hex[:8]}/e.ctraj"
    options = {"endpoint_url": s3_server}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAJSTORE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        tiny = dict(model="ConvNetW8", epochs=1, progress=False, storage_options=options)
        train_experts(url, num_experts=1, log=no_log, **tiny)
        first = trajstore.open(url, storage_options=options).expert(0).provenance
        other_job = Claims(open_store(url, options, mode="w"), lambda i: False)
        assert other_job.acquire(2)
        job = cli_process("experts", url, "--num-experts", "4", "--nproc", "2", *EXPERTS, "-S",
                          f"endpoint_url={s3_server}")
        output = job.communicate(timeout=600)[0]
        assert job.returncode == 0, output
        other_job.release_all()
        lines: list[str] = []
        train_experts(url, num_experts=4, log=lines.append, **tiny)
        yield url, options, first, output, lines


def test_experts_on_s3_in_two_processes_and_separate_jobs_share_one_store(s3_experts, reference):
    url, options, first, output, lines = s3_experts
    assert "1 experts already there, training 3 on digits (cpu x 2 processes)" in output
    assert re.search(r"left experts \[2\] to another job", output) and f"wrote {url}" in output
    assert not re.search(r"expert 2 (epoch|done)", output)  # rank 0's lines: 1 or 3 (whichever it took)
    assert "3 experts already there, training 1" in lines[0] and lines[-1].startswith("expert 2 done")
    store = trajstore.open(url, storage_options=options)
    store.verify()
    assert store.expert_ids == [0, 1, 2, 3]
    assert store.expert(0).provenance == first  # resumed: kept, not trained again
    same_experts(store, reference, range(4))  # whichever process of whichever job trained it
    assert not open_store(url, options).listdir("experts/.claims")  # every claim released


def test_distill_from_an_s3_store_is_the_run_from_the_local_copy(s3_experts, reference, tmp_path, run):
    url, options = s3_experts[:2]
    settings = ["--ipc", "1", "--syn-steps", "2", "--expert-epochs", "0.5", "--max-start-epoch", "0.5",
                "--iterations", "2", "--eval-every", "0", "--eval-nets", "1", "--eval-epochs", "1", "--quiet"]
    run("distill", url, "--out", tmp_path / "remote", *settings, "-S", f"endpoint_url={options['endpoint_url']}")
    run("distill", reference.path, "--out", tmp_path / "local", *settings)
    steps = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
              for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("remote", "local")]
    assert steps[0] == steps[1] and len(steps[0]) == 3  # 2 steps and the final evaluation
    a, b = (load_file(tmp_path / d / "synset_final.safetensors") for d in ("remote", "local"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "remote" / "config.json").read_text())["source"] == url
    assert options["endpoint_url"] not in (tmp_path / "remote" / "config.json").read_text()  # options stay out



def test_a_replayed_run_reaches_its_source_at_a_url_with_the_storage_options(s3_experts, tmp_path):
    """--config with a short preset name reads the method from the source, which is on S3: the options
    must reach it (they are never saved in config.json)."""
    from trajstore.distill.replay import replayed_config

    url, options = s3_experts[:2]
    (tmp_path / "config.json").write_text(json.dumps({"source": url, "ipc": 1}))
    config = replayed_config(tmp_path, preset="cifar10-ipc10", storage_options=options)
    assert (config.source, config.preset, config.ipc) == (url, "mct-cifar10-ipc10", 1)

@pytest.fixture(params=["s3", "memory"])
def claim_store(request):
    if request.param == "s3":
        root, _, options = request.getfixturevalue("s3")
        store = open_store(f"{root}/c.ctraj", options, mode="w")
    else:
        store = open_store(f"memory://{uuid.uuid4().hex[:8]}/c.ctraj", mode="w")
    yield store
    store.delete("")


def test_of_processes_claiming_one_expert_at_once_exactly_one_gets_it(claim_store):
    claimants = [Claims(claim_store, lambda i: False) for _ in range(6)]
    with ThreadPoolExecutor(len(claimants)) as pool:
        won = list(pool.map(lambda c: c.acquire(4), claimants))
    assert won.count(True) == 1 and claim_store.listdir("experts/.claims") == ["000004.0"]
    claimants[won.index(True)].release_all()


def test_claims_give_each_expert_to_one_process_and_stale_ones_are_taken_over(claim_store, monkeypatch):
    published = {7}
    a, b = Claims(claim_store, published.__contains__), Claims(claim_store, published.__contains__)
    assert a.acquire(3) and not b.acquire(3)  # held by a live process
    assert claim_store.listdir("experts/.claims") == ["000003.0"]
    a.release(3)
    assert claim_store.listdir("experts/.claims") == [] and b.acquire(3)
    # b's process dies (a pid that no longer exists, on this host): its claim is stale at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    doc = json.loads(claim_store.read_bytes("experts/.claims/000003.0"))
    claim_store.write_bytes("experts/.claims/000003.0", json.dumps({**doc, "pid": int(dead.stdout)}).encode())
    assert a.acquire(3) and claim_store.listdir("experts/.claims") == ["000003.0", "000003.1"]
    a.release(3)
    assert claim_store.listdir("experts/.claims") == []  # the stale generation went with it
    # a claim from another machine is stale once its heartbeat is older than STALE_S
    remote = {"host": "elsewhere", "pid": 1, "token": "x", "heartbeat": time.time()}
    claim_store.write_bytes("experts/.claims/000005.0", json.dumps(remote).encode())
    assert not a.acquire(5)
    monkeypatch.setattr(claims_module.time, "time", lambda: remote["heartbeat"] + claims_module.STALE_S + 1)
    assert a.acquire(5)
    # an expert published meanwhile is not claimed (and its claim not kept)
    assert not a.acquire(7) and "000007.0" not in claim_store.listdir("experts/.claims")
    a.release_all()


@pytest.fixture(params=["s3", "memory"])
def remote(request, tmp_path, monkeypatch):
    """(a fresh URL prefix, the CLI's storage options, its fsspec filesystem)."""
    monkeypatch.setenv("TRAJSTORE_CACHE_DIR", str(tmp_path / "anchor-cache"))
    run_id = uuid.uuid4().hex[:8]
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_server")
        yield (f"s3://trajstore-tests/{run_id}", ["-S", f"endpoint_url={endpoint}"],
               fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True))
    else:
        fs = fsspec.filesystem("memory")
        yield f"memory://{run_id}", [], fs
        fs.rm(f"/{run_id}", recursive=True)


def test_pack_and_unpack_with_urls_on_both_sides(remote, legacy_buffer, tmp_path, run, monkeypatch):
    """A legacy buffer at a URL -> an archive at a URL -> buffer files at a URL, bit for bit; and back
    to local files byte-identical to the source's."""
    root, options, fs = remote
    written = []
    real_write = FsspecStore.write_bytes
    monkeypatch.setattr(FsspecStore, "write_bytes", lambda self, key, data: written.append(key) or
                        real_write(self, key, data))
    directory, trajs = legacy_buffer  # buffers/CIFAR10_NO_ZCA/ConvNet: 5 experts, 2 per file
    src = f"{root}/buffers/CIFAR10_NO_ZCA/ConvNet"
    fs.put(str(directory), src, recursive=True)
    before = {p: fs.info(p)["size"] for p in fs.find(src)}
    out = run("pack", src, f"{root}/full.zarr", "--quiet", *options).output
    assert "packed 5 experts x 11 timesteps" in out
    run("unpack", f"{root}/full.zarr", f"{root}/restored", "--per-file", "3", "--quiet", *options)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/restored")) == ["replay_buffer_0.pt",
                                                                                  "replay_buffer_1.pt"]
    # each file written once, file 0 last: before that there is nothing upstream readers would read
    assert [k for k in written if k.startswith("replay_buffer")] == ["replay_buffer_1.pt", "replay_buffer_0.pt"]
    restored = []
    for n in range(2):
        fs.get(f"{root}/restored/replay_buffer_{n}.pt", str(tmp_path / f"r{n}.pt"))
        restored += torch.load(tmp_path / f"r{n}.pt", weights_only=True)
    assert len(restored) == 5
    assert all(torch.equal(a, b) for i in range(5) for t in range(11) for a, b in zip(restored[i][t], trajs[i][t]))
    run("unpack", f"{root}/full.zarr", tmp_path / "as-source", "--as-source", "--quiet", *options)
    for name in ("replay_buffer_0.pt", "replay_buffer_1.pt", "replay_buffer_2.pt"):
        assert (tmp_path / "as-source" / name).read_bytes() == (directory / name).read_bytes()
    archive = trajstore.archive.open_archive(f"{root}/full.zarr", storage_options=_python(options))
    assert archive.source["path"] == src and archive.training["dataset"] == "CIFAR10"  # named as at the URL
    assert {p: fs.info(p)["size"] for p in fs.find(src)} == before  # the source untouched
    again = run("pack", src, f"{root}/full.zarr", "--quiet", *options, ok=False)
    assert again.exit_code == 1 and "already exists" in again.output
    # classic MTT distills from the archive at the URL: expert 3's timesteps 2 and 2 + M, bit for bit
    experts = open_experts(f"{root}/full.zarr", storage_options=_python(options))
    assert experts.method == "mtt" and experts.path == f"{root}/full.zarr"
    start, target, info = experts.source.sample(np.random.default_rng(0), 3, 2, expert=3)
    flat = [torch.cat([p.reshape(-1) for p in trajs[3][t]]) for t in (int(info.start), int(info.start) + 2)]
    assert torch.equal(start, flat[0]) and torch.equal(target, flat[1])
    if root.startswith("s3://"):  # a command in a process of its own leaves no S3 session open at exit
        shown = cli_process("inspect", f"{root}/full.zarr", *options)
        output = shown.communicate(timeout=300)[0]
        assert shown.returncode == 0 and "(archive)" in output and "Unclosed" not in output, output


def _python(cli_options: list[str]) -> dict:
    return dict(option.split("=", 1) for option in cli_options[1::2])


def test_hostile_urls_are_one_line_and_leave_inputs_alone(remote, legacy_buffer, tmp_path, run):
    root, options, fs = remote
    directory, _ = legacy_buffer
    src = f"{root}/buffers/ConvNet"
    fs.put(str(directory), src, recursive=True)
    before = sorted((p, fs.info(p)["size"]) for p in fs.find(root))

    def refused(*args, message):
        result = run(*args, ok=False)
        assert result.exit_code == 1 and message in result.output, result.output
        lines = result.output.strip().splitlines()
        assert "Traceback" not in result.output and len(lines) == 1, result.output

    for out, relation in ((src, "is the input"), (f"{src}/full.zarr", "lies inside the input"),
                          (f"{root}/buffers", "contains the input")):
        refused("pack", src, out, "--force", "--quiet", *options, message=relation)
        refused("unpack", src, out, "--force", "--quiet", *options, message=relation)
        refused("convert", src, out, "--force", "--quiet", *options, message=relation)
    assert sorted((p, fs.info(p)["size"]) for p in fs.find(root)) == before
    refused("pack", f"{root}/nothing-here", f"{root}/x.zarr", "--quiet", *options, message="no such buffer file")
    refused("unpack", f"{root}/nothing-here", tmp_path / "x", "--quiet", *options, message="not a trajstore archive")
    refused("experts", "nosuchprotocol://bucket/e.ctraj", "--quiet", message="cannot open this URL")
    refused("distill", "nosuchprotocol://bucket/e.ctraj", "--quiet", message="cannot open this URL")
    refused("distill", f"{root}/nothing.ctraj", "--quiet", *options, message="no such .ctraj, legacy buffer")
    refused("distill", src, "--out", f"{root}/run", "--quiet", *options, message="local paths only")
    refused("experts", f"{src}/replay_buffer_0.pt", "--quiet", *options, message="not a .ctraj directory")
    assert sorted((p, fs.info(p)["size"]) for p in fs.find(root)) == before


def test_a_missing_bucket_is_one_line(s3, run):
    _, options, _ = s3
    result = run("experts", "s3://no-such-bucket-here/e.ctraj", "--num-experts", "1", *EXPERTS, "--quiet",
                 *options, ok=False)
    assert result.exit_code == 1 and "no-such-bucket-here" in result.output and "Traceback" not in result.output
    result = run("pack", "s3://no-such-bucket-here/buffers", "s3://no-such-bucket-here/x.zarr", *options, ok=False)
    assert result.exit_code == 1 and "no-such-bucket-here" in result.output and "Traceback" not in result.output

