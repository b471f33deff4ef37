"""Hostile input, class by class: every failure is one TrajstoreError naming the file, no numbers change
silently, and no input is ever destroyed (issue 14). Expected values come from the spec (docs/format.md)
and from checksums recomputed here with hashlib, never from the code under test."""

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import SMALL_LAYERS, random_walk, write_store

import trajstore
import trajstore.legacy
from trajstore.archive import pack, unpack
from trajstore.format.singlefile import to_single_file
from trajstore.tools.convert import convert
from trajstore.tools.export import export_mtt


@pytest.fixture
def store(tmp_path):
    return write_store(tmp_path / "a.ctraj", [random_walk(seed=s) for s in range(2)], waypoints=(5,))


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def edit_root(path: Path, **changes):
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"]["trajstore"].update(changes)
    (path / "zarr.json").write_text(json.dumps(doc))


def manifest_path(path: Path, expert: str = "000000") -> Path:
    return path / "experts" / expert / "zarr.json"


def edit_manifest(path: Path, expert: str = "000000", fn=None):
    doc = json.loads(manifest_path(path, expert).read_text())
    fn(doc["attributes"]["trajstore_expert"])
    manifest_path(path, expert).write_text(json.dumps(doc))


def reseal_root(path: Path):
    """Record every expert's manifest sha256 in the root and the root's own sha256, as docs/format.md §2
    defines them (written here from the spec): what a hand edit that knows the format would do."""
    root = path / "zarr.json"
    doc = json.loads(root.read_text())
    meta = doc["attributes"]["trajstore"]
    meta["experts"] = {name: hashlib.sha256((path / "experts" / name / "zarr.json").read_bytes()).hexdigest()
                       for name in meta["experts"]}
    meta["sha256"] = "0" * 64
    data = json.dumps(doc, indent=2).encode()
    digest = hashlib.sha256(data).hexdigest()
    root.write_bytes(data.replace(b'"' + b"0" * 64 + b'"', f'"{digest}"'.encode()))


def rewrite_array(path: Path, expert: str, name: str, values: np.ndarray):
    """Replace an expert's zarr array with `values` and record the new files' sha256 in its manifest,
    as a hand edit that knows the format would (so only value checks can catch it)."""
    import zarr
    from zarr.storage import LocalStore

    d = path / "experts" / expert
    shutil.rmtree(d / name)
    zarr.create_array(LocalStore(d), name=name, data=values, chunks=values.shape)

    def reseal(info):
        info["files"] = {k: v for k, v in info["files"].items() if not k.startswith(f"{name}/")}
        for p in (d / name).rglob("*"):
            if p.is_file():
                info["files"][str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()

    edit_manifest(path, expert, reseal)
    reseal_root(path)


def cli(*args):
    """Run the trajstore command in this process; a raised exception is reported as a traceback."""
    from click.testing import CliRunner

    from trajstore.cli.main import cli as command

    result = CliRunner().invoke(command, [str(a) for a in args])
    raw = result.exception if not isinstance(result.exception, (SystemExit, type(None))) else None
    return SimpleNamespace(returncode=result.exit_code, stdout=result.output,
                           stderr=result.output + (f"\nTraceback: {raw!r}" if raw else ""))


def assert_one_line_error(result, *needles):
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    progress = re.compile(r"^[\w ]+:\s+\d+%\|")  # tqdm's bar, redrawn with \r, is not an error line
    lines = [ln for ln in re.split(r"[\r\n]", result.stderr) if ln.strip() and not progress.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- class 7: lax validation ---------------------------------------------------------------------

@pytest.mark.parametrize("changes,match", [
    ({"complete": "false"}, "complete"),
    ({"complete": 1}, "complete"),
    ({"version": -1}, "version"),
    ({"version": 0}, "version"),
    ({"anchor_epochs": [0, 5.5, 10]}, "anchor_epochs"),
    ({"anchor_epochs": [0, "5", 10]}, "anchor_epochs"),
    ({"num_timesteps": "11"}, "num_timesteps"),
    ({"num_timesteps": 11.0}, "num_timesteps"),
    ({"experts_group": "../experts"}, "experts_group"),  # never a key outside the store's groups
    ({"experts_group": "experts.0123456789ABCDEF"}, "experts_group"),
    ({"experts_group": 7}, "experts_group"),
])
def test_root_metadata_of_the_wrong_type_is_refused(store, changes, match):
    edit_root(store, **changes)
    with pytest.raises(trajstore.FormatError, match=match) as info:
        trajstore.open(store)
    assert "zarr.json" in str(info.value)


def test_layer_entries_of_the_wrong_type_are_refused(store):
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["trajstore"]["layers"][1]["shape"] = ["8"]
    (store / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(trajstore.FormatError, match="layer entry"):
        trajstore.open(store)


@pytest.mark.parametrize("edit,match", [
    (lambda b: b.__setitem__((3, 0), 1.5), r"outside \[0, 1\]"),
    (lambda b: b.__setitem__((3, 0), -0.1), r"outside \[0, 1\]"),
    (lambda b: b.__setitem__((3, 0), b[2, 0] - 0.01), "decreases"),
    (lambda b: b.__setitem__((5, 1), 0.25), "not 0 at anchor epoch 5"),
    (lambda b: b.__setitem__((10, 2), 0.75), "not 1 at the last epoch"),
])
def test_betas_that_break_the_spec_are_refused(store, edit, match):
    beta = trajstore.open(store).expert(0).beta.copy()
    edit(beta)
    rewrite_array(store, "000000", "beta", beta)
    with pytest.raises(trajstore.FormatError, match=match):
        trajstore.open(store).expert(0).at(3.5)
    with pytest.raises(trajstore.FormatError, match=match):
        trajstore.open(store).verify()


def test_negative_step_norms_are_refused(store):
    norms = trajstore.open(store).expert(1).step_norms.copy()
    norms[4, 0] = -1.0
    rewrite_array(store, "000001", "step_norms", norms)
    with pytest.raises(trajstore.FormatError, match="negative"):
        trajstore.open(store).verify()


@pytest.mark.parametrize("key", ["beta/../../000001/beta/zarr.json", "/etc/passwd", "beta//c/0/0",
                                 "step_norms/./zarr.json"])
def test_manifest_keys_that_leave_the_expert_are_refused(store, key):
    other = store / "experts" / "000001" / "beta" / "zarr.json"

    def add(info):
        info["files"][key] = hashlib.sha256(other.read_bytes()).hexdigest()

    edit_manifest(store, "000000", add)
    with pytest.raises(trajstore.FormatError, match="leaves the expert directory"):
        trajstore.open(store).expert(0).at(1.5)


@pytest.mark.parametrize("kwargs", [dict(waypoints="36"), dict(waypoints="5"), dict(waypoints=(5.5,)),
                                    dict(anchor_epochs=(0, 5.5, 10)), dict(anchor_epochs="0,5,10"),
                                    dict(waypoints=(True,))])
def test_create_refuses_anchor_arguments_it_would_have_to_guess(tmp_path, kwargs):
    with pytest.raises(trajstore.TrajstoreError, match="waypoints|anchor_epochs"):
        trajstore.create(tmp_path / "g.ctraj", SMALL_LAYERS, 11, **kwargs)
    assert not (tmp_path / "g.ctraj").exists()


def test_single_file_never_follows_links_out_of_the_store(store, tmp_path):
    # the anchor's bytes now live outside the store; the link verifies (same bytes), but the single
    # file must not copy whatever a link points to (it could be anything the user can read)
    anchor = store / "experts" / "000000" / "anchor_0005.safetensors"
    outside = tmp_path / "outside.safetensors"
    shutil.move(anchor, outside)
    anchor.symlink_to(outside)
    trajstore.open(store).verify()
    with pytest.raises(trajstore.TrajstoreError, match="symbolic link"):
        to_single_file(store, tmp_path / "one.ctraj")
    assert not (tmp_path / "one.ctraj").exists()


def test_verify_refuses_a_file_the_manifest_does_not_list(store):
    (store / "experts" / "000001" / "beta" / "c" / "0" / "1").write_bytes(b"\0" * 16)
    with pytest.raises(trajstore.FormatError, match="not listed"):
        trajstore.open(store).verify()


# -- class 6: raw exceptions -----------------------------------------------------------------------

def deep_json(depth=200_000):
    return ('{"a":' * depth + "1" + "}" * depth).encode()


def test_deeply_nested_root_json(store):
    (store / "zarr.json").write_bytes(deep_json())
    with pytest.raises(trajstore.FormatError, match="zarr.json"):
        trajstore.open(store)


def test_deeply_nested_manifest(store):
    manifest_path(store, "000001").write_bytes(deep_json())
    with pytest.raises(trajstore.FormatError, match="000001"):
        trajstore.open(store).expert(1).at(2.5)


def test_deeply_nested_archive_metadata_is_one_clean_line(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    pack(directory, tmp_path / "p.zarr", progress=False)
    (tmp_path / "p.zarr" / "zarr.json").write_bytes(deep_json())
    assert_one_line_error(cli("verify", tmp_path / "p.zarr"))


@pytest.mark.parametrize("edit", [
    lambda info: info["files"].__setitem__("anchor_0005.safetensors", 12345),
    lambda info: info["files"].__setitem__("anchor_0005.safetensors", None),
    lambda info: info["files"].__setitem__("anchor_0005.safetensors", "ABC"),
    lambda info: info.__setitem__("id", "0"),
    lambda info: info.__setitem__("id", 7),
])
def test_manifest_of_the_wrong_type(store, edit):
    edit_manifest(store, "000000", edit)
    with pytest.raises(trajstore.FormatError, match="000000"):
        trajstore.open(store).expert(0).at(5.5)


def test_empty_layer_table(store):
    edit_root(store, layers=[])
    with pytest.raises(trajstore.FormatError, match="layers"):
        trajstore.open(store).expert(0).at(1)


def test_expert_names_in_other_scripts_are_not_experts(store):
    before = trajstore.open(store).expert(1).at(2.5, flat=True)
    for name in ("\u00b2", "\u0661", "\u0660\u0660\u0660\u0660\u0660\u0661"):  # superscript 2, Arabic-Indic 1, 000001
        shutil.copytree(store / "experts" / "000000", store / "experts" / name)
    reader = trajstore.open(store)
    assert reader.expert_ids == [0, 1]
    assert torch.equal(reader.expert(1).at(2.5, flat=True), before)


def corrupt_central_directories(path: Path):
    """Yield variants of a zip file with one central-directory byte changed."""
    data = path.read_bytes()
    end = data.rfind(b"PK\x05\x06")
    start = int.from_bytes(data[end + 16 : end + 20], "little")
    rng = np.random.default_rng(3)
    for pos in rng.choice(np.arange(start, len(data)), size=60, replace=False):
        for value in (0x00, 0xFF, data[pos] ^ 0x80):
            yield bytes(data[:pos]) + bytes([value]) + data[pos + 1 :]


def test_corrupt_zip_central_directory(store, tmp_path):
    single = to_single_file(store, tmp_path / "one.ctraj")
    expected = [trajstore.open(single).expert(i).at(7.25, flat=True) for i in range(2)]
    bad = tmp_path / "bad.ctraj"
    for variant in corrupt_central_directories(single):
        bad.write_bytes(variant)
        try:
            reader = trajstore.open(bad)
            got = [reader.expert(i).at(7.25, flat=True) for i in range(reader.num_experts)]
            reader.verify()
        except trajstore.TrajstoreError:
            continue
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("call", [
    lambda e: e.at(10**400),
    lambda e: e.at("1.5"),
    lambda e: e.at(b"1"),
    lambda e: e.at(None),
    lambda e: e.at(True),
    lambda e: e.window(1.0, "2"),
    lambda e: e.window(1.0, 10**400),
    lambda e: e.window("1", 2),
    lambda e: e.at(1.5, dtype=torch.int32),
    lambda e: e.at(1.5, dtype="float32"),
    lambda e: e.at(1.5, device="no-such-device"),
    lambda e: e.at(1.5, flat=True, out=np.zeros(400, dtype=np.float32)),
    lambda e: e.at(1.5, out=torch.zeros(10)),
    lambda e: e.anchor(5.0),
    lambda e: e.anchor("5"),
])
def test_api_arguments_of_the_wrong_type_or_range(store, call):
    expert = trajstore.open(store).expert(0)
    with pytest.raises(trajstore.TrajstoreError, match="a.ctraj"):
        call(expert)


def test_api_accepts_numbers_of_any_real_type(store):
    expert = trajstore.open(store).expert(0)
    want = expert.at(2.5, flat=True)
    for c in (np.float32(2.5), np.float64(2.5), torch.tensor(2.5, dtype=torch.float64)):
        assert torch.equal(expert.at(c, flat=True), want)
    assert torch.equal(expert.at(np.int64(5), flat=True), expert.at(5, flat=True))


@pytest.mark.parametrize("kwargs", [dict(num_timesteps="11"), dict(num_timesteps=11.0), dict(num_timesteps=True)])
def test_create_refuses_num_timesteps_of_the_wrong_type(tmp_path, kwargs):
    with pytest.raises(trajstore.TrajstoreError, match="num_timesteps"):
        trajstore.create(tmp_path / "n.ctraj", SMALL_LAYERS, **kwargs)


def test_writer_expert_index_of_the_wrong_type(tmp_path):
    with trajstore.create(tmp_path / "w.ctraj", SMALL_LAYERS, 11) as w:
        for index in ("3", 3.0, True):
            with pytest.raises(trajstore.TrajstoreError, match="expert index"):
                w.expert(index)


def test_create_refuses_an_unsupported_dtype(tmp_path):
    with pytest.raises(trajstore.InvalidTensorError, match="dtype"):
        trajstore.create(tmp_path / "d.ctraj", [("w", (3,), torch.int32)], 11)


def test_stride_zero_tensor_claiming_terabytes_is_refused_before_allocating(tmp_path):
    buf = tmp_path / "buffers" / "huge"
    buf.mkdir(parents=True)
    huge = torch.zeros(1).expand(2**40)  # one stored float that claims 4 TiB
    traj = [[huge, torch.randn(3)], [huge, torch.randn(3)]]
    torch.save([traj], buf / "replay_buffer_0.pt")
    assert (buf / "replay_buffer_0.pt").stat().st_size < 10_000
    with pytest.raises(trajstore.FormatError, match="refused before allocating") as info:
        trajstore.legacy.open_buffer(buf)
    assert "replay_buffer_0.pt" in str(info.value)
    assert_one_line_error(cli("convert", buf, tmp_path / "h.ctraj"), "replay_buffer_0.pt")


def _without_file_access_override():
    """In the child: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so even root
    is held to the permission bits after exec (as every other user is)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


CHILD = """
import json, sys
from click.testing import CliRunner
import trajstore
from trajstore.cli.main import cli
results = []
for args in json.loads(sys.argv[1]):
    if args[0] == "open":  # the Python API
        try:
            trajstore.open(args[1])
            results.append({"code": 0, "output": ""})
        except trajstore.TrajstoreError as exc:
            results.append({"code": 1, "output": f"Error: {exc}"})
        continue
    r = CliRunner().invoke(cli, args)
    raw = r.exception if not isinstance(r.exception, (SystemExit, type(None))) else None
    results.append({"code": r.exit_code, "output": r.output + (f"Traceback: {raw!r}" if raw else "")})
print(json.dumps(results))
"""


def cli_in_child(preexec, *commands):
    """Run trajstore commands in one child process set up by `preexec` (one torch import for all)."""
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps([[str(a) for a in c] for c in commands])],
                            capture_output=True, text=True, preexec_fn=preexec, timeout=300)
    assert result.returncode == 0, result.stderr
    return [SimpleNamespace(returncode=r["code"], stderr=r["output"], stdout=r["output"])
            for r in json.loads(result.stdout.strip().splitlines()[-1])]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses Linux capabilities")
def test_permission_errors_are_one_line_naming_the_file(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    hidden = write_store(tmp_path / "hidden.ctraj", [random_walk()])
    single = to_single_file(hidden, tmp_path / "single.ctraj")
    blocked = shutil.copytree(directory, tmp_path / "blocked")
    for path, mode in ((readonly, 0o555), (hidden / "experts", 0o000), (single, 0o000),
                       (blocked / "replay_buffer_1.pt", 0o000)):
        os.chmod(path, mode)
    try:
        results = cli_in_child(_without_file_access_override,
                               ["convert", directory, readonly / "out.ctraj"], ["verify", hidden],
                               ["open", single], ["convert", blocked, tmp_path / "o.ctraj"])
    finally:
        for path in (readonly, hidden / "experts", single, blocked / "replay_buffer_1.pt"):
            os.chmod(path, 0o755)
    for result, needles in zip(results, [("readonly", "ermission"), ("experts", "ermission"),
                                         ("single.ctraj", "ermission"), ("replay_buffer_1.pt",)]):
        assert_one_line_error(result, *needles)
    assert list(readonly.iterdir()) == [] and not (tmp_path / "o.ctraj").exists()


def _file_size_limit(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-limit write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path, legacy_buffer):
    """A process file-size limit makes the kernel refuse writes past 2 KiB (EFBIG), as a full disk does."""
    directory, _ = legacy_buffer
    src = convert(directory, tmp_path / "src.ctraj", progress=False).out
    outs = {command: tmp_path / f"out-{command}" for command in ("convert", "pack", "export")}
    results = cli_in_child(_file_size_limit(2048), *[[command, directory if command != "export" else src, out,
                                                      "--quiet"] for command, out in outs.items()])
    for result, out in zip(results, outs.values()):
        assert_one_line_error(result, out.name)
        assert "space" in result.stderr or "too large" in result.stderr
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffers", "src.ctraj"]  # no temporary left


# -- class 5: legacy discovery -----------------------------------------------------------------------

@pytest.mark.parametrize("names", [("replay_buffer_7.pt", "replay_buffer_007.pt"),
                                   ("replay_buffer_0.pt", "replay_buffer_00.pt"),
                                   ("convexified_replay_buffer_1.pt", "convexified_replay_buffer_01.pt")])
def test_ambiguous_numbering_is_refused(tmp_path, legacy_write, names):
    directory = tmp_path / "ConvNet"
    legacy_write(directory, 1)
    trajs = torch.load(directory / "replay_buffer_0.pt", weights_only=True)
    (directory / "replay_buffer_0.pt").unlink()
    for name in names:
        torch.save(trajs, directory / name)
    with pytest.raises(trajstore.FormatError, match="both number") as info:
        trajstore.legacy.open_buffer(directory)
    assert all(name in str(info.value) for name in names)


def test_digits_of_other_scripts_do_not_number_buffer_files(tmp_path, legacy_write):
    directory = tmp_path / "ConvNet"
    legacy_write(directory, 2, per_file=1)
    shutil.copy(directory / "replay_buffer_1.pt", directory / "replay_buffer_\u0661.pt")  # Arabic-Indic 1
    buf = trajstore.legacy.open_buffer(directory)
    assert [f.name for f in buf.files] == ["replay_buffer_0.pt", "replay_buffer_1.pt"]


# -- class 4: outputs overlapping inputs, cleanup, links ---------------------------------------------

def test_convert_onto_its_own_source_is_refused(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    before = tree_digest(directory.parent.parent)
    for out in (directory, directory.parent, directory / "inner.ctraj", directory / "replay_buffer_0.pt"):
        with pytest.raises(trajstore.TrajstoreError, match="input"):
            convert(directory, out, overwrite=True, progress=False)
        assert_one_line_error(cli("convert", directory, out, "--force"), "input")
    assert tree_digest(directory.parent.parent) == before


def test_convert_through_a_symlink_to_the_source_is_refused(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    link = tmp_path / "link"
    link.symlink_to(directory)
    before = tree_digest(directory)
    with pytest.raises(trajstore.TrajstoreError, match="input"):
        convert(directory, link, overwrite=True, progress=False)
    assert tree_digest(directory) == before and link.is_symlink()


def test_export_into_its_own_store_is_refused(store, tmp_path):
    before = tree_digest(store)
    for out in (store, store / "experts" / "000000", store.parent):
        with pytest.raises(trajstore.TrajstoreError, match="input"):
            export_mtt(store, out, overwrite=True, progress=False)
    assert_one_line_error(cli("export", store, store / "experts" / "000000", "--force"), "input")
    assert tree_digest(store) == before
    trajstore.open(store).verify()


def test_pack_unpack_and_single_file_refuse_overlap(tmp_path, legacy_buffer, store):
    directory, _ = legacy_buffer
    before = tree_digest(directory)
    with pytest.raises(trajstore.TrajstoreError, match="input"):
        pack(directory, directory, overwrite=True, progress=False)
    with pytest.raises(trajstore.TrajstoreError, match="input"):
        pack(directory, directory.parent, overwrite=True, progress=False)
    assert tree_digest(directory) == before
    archive = tmp_path / "p.zarr"
    pack(directory, archive, progress=False)
    packed = tree_digest(archive)
    with pytest.raises(trajstore.TrajstoreError, match="input"):
        unpack(archive, archive / "params", overwrite=True, progress=False)
    assert tree_digest(archive) == packed
    with pytest.raises(trajstore.TrajstoreError, match="input"):
        to_single_file(store, store / "experts" / "x.ctraj")


def test_convert_never_deletes_an_output_it_did_not_create(tmp_path, legacy_buffer, monkeypatch):
    """Another process creates OUT after convert checked that it is free: convert must fail without
    touching it (before, convert's cleanup deleted the other process's output)."""
    import trajstore.tools.convert as convert_module

    directory, _ = legacy_buffer
    out = tmp_path / "out.ctraj"
    real_open = convert_module.open_source

    def open_then_race(*args, **kwargs):
        source = real_open(*args, **kwargs)
        write_store(out, [random_walk(seed=5)])  # the concurrent run, finished first
        return source

    monkeypatch.setattr(convert_module, "open_source", open_then_race)
    with pytest.raises(trajstore.ExistsError):
        convert(directory, out, progress=False)
    theirs = tree_digest(out)
    assert theirs and trajstore.open(out).num_experts == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_convert_failure_removes_only_its_own_temporary(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    bad = torch.load(directory / "replay_buffer_2.pt", weights_only=True)
    bad[0][4][0][0] = float("nan")
    torch.save(bad, directory / "replay_buffer_2.pt")
    with pytest.raises(trajstore.InvalidTensorError, match="replay_buffer_2.pt"):
        convert(directory, tmp_path / "out.ctraj", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffers"]


def test_dangling_symlink_output_is_refused_and_kept(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    link = tmp_path / "dangling.ctraj"
    link.symlink_to(tmp_path / "nowhere" / "x.ctraj")
    for force in (False, True):
        with pytest.raises(trajstore.ExistsError, match="symbolic link|exists"):
            convert(directory, link, overwrite=force, progress=False)
        assert link.is_symlink()
    with pytest.raises(trajstore.ExistsError, match="symbolic link"):
        trajstore.create(link, SMALL_LAYERS, 11)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


# -- class 1: metadata that decides numbers is covered by a checksum and cross-checked ----------------

def numbers(path, c=7.25):
    reader = trajstore.open(path)
    return [reader.expert(i).at(c, flat=True) for i in range(reader.num_experts)]


@pytest.mark.parametrize("edit", [
    lambda m: m.__setitem__("anchor_epochs", [0, 10]),  # drop the inner anchor
    lambda m: m.__setitem__("layers", m["layers"][::-1]),  # reorder the layer table
    lambda m: m["layers"][2].__setitem__("name", "fc.renamed"),
    lambda m: m.__setitem__("smoothing", "mct"),
    lambda m: m["provenance"].__setitem__("tool", "someone else"),
])
def test_any_edit_of_the_root_metadata_is_detected(store, edit):
    doc = json.loads((store / "zarr.json").read_text())
    edit(doc["attributes"]["trajstore"])
    (store / "zarr.json").write_text(json.dumps(doc, indent=2))
    with pytest.raises(trajstore.ChecksumError, match="zarr.json"):
        trajstore.open(store)
    assert_one_line_error(cli("verify", store), "zarr.json")


def test_a_resealed_anchor_edit_is_still_caught_by_the_experts_files(store):
    """Even an edit that recomputes the root's checksum cannot drop an anchor: every expert's
    manifest lists exactly the anchor files of the store's anchor epochs."""
    edit_root(store, anchor_epochs=[0, 10])
    reseal_root(store)
    with pytest.raises(trajstore.FormatError, match="anchor_0005"):
        trajstore.open(store).expert(0).at(7.25)
    assert_one_line_error(cli("verify", store), "anchor_0005")


def test_archive_root_metadata_edit_is_detected(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    archive = tmp_path / "p.zarr"
    pack(directory, archive, progress=False)
    doc = json.loads((archive / "zarr.json").read_text())
    layers = doc["attributes"]["trajstore_archive"]["layers"]
    layers[0]["name"], layers[1]["name"] = layers[1]["name"], layers[0]["name"]  # swap two names
    (archive / "zarr.json").write_text(json.dumps(doc, indent=2))
    assert_one_line_error(cli("verify", archive), "zarr.json")
    with pytest.raises(trajstore.ChecksumError):
        convert(archive, tmp_path / "c.ctraj", progress=False)
    assert not (tmp_path / "c.ctraj").exists()


def test_archive_array_metadata_edit_is_detected(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    archive = tmp_path / "p.zarr"
    pack(directory, archive, progress=False)
    meta = archive / "params" / "001" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["layer"]["name"] = "other"
    meta.write_text(json.dumps(doc))
    assert_one_line_error(cli("verify", archive), "001")


# -- class 2: the manifest is enforced ------------------------------------------------------------

def test_a_chunk_dropped_from_the_manifest_is_never_read(store):
    """Drop a beta chunk's line from the manifest and rewrite the chunk (with a resealed root, so only
    manifest enforcement can catch it): reading must refuse, not decode the unlisted chunk."""
    import zarr
    from zarr.storage import LocalStore

    d = store / "experts" / "000000"
    beta = trajstore.open(store).expert(0).beta.copy()
    beta[2:5, 0] = np.linspace(0.01, 0.02, 3)  # other numbers, still a valid schedule
    shutil.rmtree(d / "beta")
    zarr.create_array(LocalStore(d), name="beta", data=beta, chunks=beta.shape)
    edit_manifest(store, "000000", lambda info: info["files"].pop("beta/c/0/0"))
    reseal_root(store)
    with pytest.raises(trajstore.FormatError, match="c/0/0"):
        trajstore.open(store).expert(0).at(3.5)
    assert_one_line_error(cli("verify", store), "c/0/0")


def test_a_manifest_edit_without_resealing_is_a_checksum_error(store):
    edit_manifest(store, "000001", lambda info: info["provenance"].__setitem__("written", "yesterday"))
    with pytest.raises(trajstore.ChecksumError, match="000001"):
        trajstore.open(store).expert(1).at(3.5)
    assert_one_line_error(cli("verify", store), "000001")


# -- class 3: the store records its experts ------------------------------------------------------

def test_a_deleted_expert_is_an_error_not_a_smaller_store(store):
    (store / "experts" / "000001" / "zarr.json").unlink()
    with pytest.raises(trajstore.FormatError, match="000001"):
        trajstore.open(store)
    assert_one_line_error(cli("verify", store), "000001")
    shutil.rmtree(store / "experts" / "000001")
    assert_one_line_error(cli("verify", store), "000001")


def test_a_renamed_expert_member_of_the_single_file_is_an_error(store, tmp_path):
    single = to_single_file(store, tmp_path / "one.ctraj")
    data = bytearray(single.read_bytes())
    name = b"experts/000001/zarr.json"
    central = data.rfind(name)  # the central directory's copy of the member name
    assert central > data.find(name)
    data[central + len(name) - 1] ^= 0x01  # zarr.json -> zarr.jsoo
    single.write_bytes(bytes(data))
    with pytest.raises(trajstore.FormatError, match="000001"):
        trajstore.open(single)


def test_non_canonical_expert_names_never_alias(store, tmp_path):
    want = numbers(store)
    for name in ("1", "0000001", "01"):
        shutil.copytree(store / "experts" / "000001", store / "experts" / name)
    reader = trajstore.open(store)
    assert len(reader) == 2 and reader.expert_ids == [0, 1]
    reader.verify()
    assert all(torch.equal(a, b) for a, b in zip(numbers(store), want))
    files = export_mtt(store, tmp_path / "exported", progress=False)
    assert len(torch.load(files[0], weights_only=True)) == 2


def test_concurrent_appenders_all_end_up_listed(store):
    """Writer B publishes and closes between writer A's listing of the experts and A's write of the
    root (the worst interleaving, made deterministic): the root that stays must still list B's expert."""
    a = trajstore.create(store, SMALL_LAYERS, 11, waypoints=(5,), append=True)
    a.write_expert(random_walk(seed=10), index=10)
    write = a._store.write_bytes
    raced = []

    def b_closes_first(key, data):
        if key == "zarr.json" and not raced:
            raced.append(True)
            with trajstore.create(store, SMALL_LAYERS, 11, waypoints=(5,), append=True) as b:
                b.write_expert(random_walk(seed=11), index=11)
        write(key, data)

    a._store.write_bytes = b_closes_first
    a.close()
    assert raced
    reader = trajstore.open(store)
    assert reader.expert_ids == [0, 1, 10, 11] and reader.unlisted_ids == []
    reader.verify()


def test_an_append_in_progress_or_interrupted_is_not_yet_part_of_the_store(store):
    before = numbers(store)
    w = trajstore.create(store, SMALL_LAYERS, 11, waypoints=(5,), append=True)
    w.write_expert(random_walk(seed=7))  # published, but the writer has not closed (or crashed)
    reader = trajstore.open(store)
    assert reader.expert_ids == [0, 1] and reader.unlisted_ids == [2]
    reader.verify()
    result = cli("verify", store, "--quiet")
    assert result.returncode == 0 and "2 experts" in result.stdout and "note: 1 expert(s)" in result.stdout
    assert all(torch.equal(a, b) for a, b in zip(numbers(store), before))
    with trajstore.create(store, SMALL_LAYERS, 11, waypoints=(5,), append=True):
        pass  # resuming lists it
    assert trajstore.open(store).expert_ids == [0, 1, 2]


# -- format version 1 is still read --------------------------------------------------------------

def as_version_1(path: Path):
    """What trajstore 0.1 wrote: the same tree, the root without `experts` and `sha256`, version 1."""
    doc = json.loads((path / "zarr.json").read_text())
    meta = doc["attributes"]["trajstore"]
    del meta["experts"], meta["sha256"]
    meta["version"] = 1
    (path / "zarr.json").write_text(json.dumps(doc, indent=2, sort_keys=True))


def test_version_1_stores_read_the_same_numbers(store):
    want = numbers(store)
    as_version_1(store)
    reader = trajstore.open(store)
    reader.verify()
    assert reader.meta.version == 1
    assert all(torch.equal(a, b) for a, b in zip(numbers(store), want))
    # appending upgrades it: the closing writer records the experts and the root's sha256
    with trajstore.create(store, SMALL_LAYERS, 11, waypoints=(5,), append=True) as w:
        w.write_expert(random_walk(seed=3))
    assert json.loads((store / "zarr.json").read_text())["attributes"]["trajstore"]["version"] == 2
    assert trajstore.open(store).expert_ids == [0, 1, 2]


def test_what_a_version_1_store_cannot_detect(store):
    """docs/format.md §9: a version-1 root has no checksum and no expert list, so a deleted expert
    or a reordered layer table of equal shapes goes unnoticed; the manifests still catch the rest."""
    as_version_1(store)
    shutil.rmtree(store / "experts" / "000001")
    assert trajstore.open(store).expert_ids == [0]
    edit_root(store, anchor_epochs=[0, 10])
    with pytest.raises(trajstore.FormatError, match="anchor_0005"):
        trajstore.open(store).verify()
