"""Seeded fuzzing: flip bytes in, and truncate, every file of a small directory store, a single-file
store, a packed archive and a legacy buffer. Every outcome must be the original numbers or one
TrajstoreError: never another exception, never different numbers (issue 14). The expected numbers
are read from the intact files before any damage."""

import random
import shutil

import pytest
import torch
from helpers import random_walk, write_store

import trajstore
import trajstore.legacy
from trajstore.archive import open_archive, pack
from trajstore.format.singlefile import to_single_file

SEED = 14
POSITIONS = (0.0, 2.5, 5.0, 7.25, 10.0)


def damaged(data: bytes, rng: random.Random, cases: int):
    """`cases` variants of data: half with one byte changed (a bit flip, 0x00 or 0xFF), half truncated."""
    for k in range(cases):
        if k % 2 == 0 and data:
            pos = rng.randrange(len(data))
            value = rng.choice([data[pos] ^ (1 << rng.randrange(8)), 0x00, 0xFF])
            if value == data[pos]:
                value ^= 0x01
            yield f"byte {pos} -> {value:#04x}", data[:pos] + bytes([value]) + data[pos + 1:]
        else:
            cut = rng.randrange(len(data)) if data else 0
            yield f"truncated to {cut} bytes", data[:cut]


def ctraj_numbers(path):
    """Every expert's theta(c) at POSITIONS, after `verify` (which must catch any change to a number)."""
    reader = trajstore.open(path)
    reader.verify()
    return [[reader.expert(i).at(c, flat=True).clone() for c in POSITIONS] for i in range(reader.num_experts)]


def archive_numbers(path):
    archive = open_archive(path)
    archive.verify()
    return [[t.clone() for step in archive.trajectory(i) for t in step] for i in range(archive.num_experts)]


def legacy_numbers(path):
    buffer = trajstore.legacy.open_buffer(path)
    buffer.verify()
    return [[t.clone() for step in buffer.trajectory(i) for t in step] for i in range(buffer.num_experts)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y))
                                    for x, y in zip(a, b))


def fuzz_files(root, files, read, cases_per_file, rng):
    """Damage each file in turn (restoring it after), read, and check the outcome; returns counts."""
    want = read(root)
    outcomes = {"refused": 0, "same numbers": 0}
    for f in files:
        original = f.read_bytes()
        for what, data in damaged(original, rng, cases_per_file):
            f.write_bytes(data)
            try:
                got = read(root)
            except trajstore.TrajstoreError:
                outcomes["refused"] += 1
            except Exception as exc:  # anything else is the bug this test is for
                pytest.fail(f"{f.relative_to(root.parent)} {what}: {type(exc).__name__}: {exc}")
            else:
                assert same(got, want), f"{f.relative_to(root.parent)} {what}: read other numbers"
                outcomes["same numbers"] += 1
            finally:
                f.write_bytes(original)
    return outcomes


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    store = write_store(root / "dir.ctraj", [random_walk(seed=s) for s in range(2)], waypoints=(5,))
    single = to_single_file(store, root / "single.ctraj")
    legacy = root / "buffers" / "ConvNet"
    legacy.mkdir(parents=True)
    torch.save([random_walk(seed=7, num_timesteps=6), random_walk(seed=8, num_timesteps=6)],
               legacy / "replay_buffer_0.pt")
    archive = pack(legacy, root / "packed.zarr", progress=False).out
    return {"dir": store, "single": single, "archive": archive, "legacy": legacy}


def copy_of(path, tmp_path):
    dst = tmp_path / path.name
    (shutil.copytree if path.is_dir() else shutil.copy)(path, dst)
    return dst


def test_fuzz_directory_store(sources, tmp_path):
    root = copy_of(sources["dir"], tmp_path)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) == 18  # root, experts group, 2 x (manifest, 3 anchors, 2 x (array meta, chunk))
    outcomes = fuzz_files(root, files, ctraj_numbers, 6, random.Random(SEED))
    assert outcomes["refused"] > 90


def test_fuzz_single_file_store(sources, tmp_path):
    single = copy_of(sources["single"], tmp_path)
    outcomes = fuzz_files(single, [single], ctraj_numbers, 80, random.Random(SEED + 1))
    assert outcomes["refused"] > 60


def test_fuzz_packed_archive(sources, tmp_path):
    root = copy_of(sources["archive"], tmp_path)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    outcomes = fuzz_files(root, files, archive_numbers, 4, random.Random(SEED + 2))
    assert outcomes["refused"] > len(files) * 2


def test_fuzz_legacy_buffer(sources, tmp_path):
    root = copy_of(sources["legacy"], tmp_path)
    outcomes = fuzz_files(root, [root / "replay_buffer_0.pt"], legacy_numbers, 60, random.Random(SEED + 3))
    assert outcomes["refused"] > 40


def test_fuzz_the_command_line(sources, tmp_path):
    """The commands detect what a path is before reading it: a damaged single file or archive must
    still end in exit status 0 or one error line (1), never a traceback."""
    from click.testing import CliRunner

    from trajstore.cli.main import cli

    rng = random.Random(SEED + 4)
    single = copy_of(sources["single"], tmp_path)
    archive = copy_of(sources["archive"], tmp_path)
    targets = [(single, single), (archive, archive / "zarr.json"), (archive, archive / "params" / "000" / "zarr.json")]
    for path, f in targets:
        original = f.read_bytes()
        variants = list(damaged(original, rng, 16))
        if f == single:  # and as many in its zip central directory, which the commands read first
            start = int.from_bytes(original[original.rfind(b"PK\x05\x06") + 16:][:4], "little")
            for pos in rng.sample(range(start, len(original)), 16):
                variants.append((f"central directory byte {pos}", original[:pos] + bytes([original[pos] ^ 0x10])
                                 + original[pos + 1:]))
        for what, data in variants:
            f.write_bytes(data)
            for args in (["verify", "--quiet", path], ["inspect", path]):
                result = CliRunner().invoke(cli, [str(a) for a in args])
                assert result.exit_code in (0, 1) and isinstance(result.exception, (SystemExit, type(None))), \
                    f"{args[0]} {f.name} {what}: {result.exception!r}"
        f.write_bytes(original)
