"""Conformance with docs/format.md: golden stores + expected values computed with numpy alone
(tests/data/make_golden.py), a numpy-only reader written from the spec (tests/spec_reader.py), and
trajstore held to both bit for bit in float32, float16 and bfloat16."""

from __future__ import annotations

import shutil
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import spec_reader
from spec_reader import SpecStore, to_bits

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
import make_golden  # noqa: E402

GOLDEN = DATA / "golden"
CASES = [(d, a) for d in make_golden.DTYPES for a in (d, make_golden.ALSO_AS[d])]
TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def expected(dtype: str):
    return np.load(GOLDEN / f"{dtype.lower()}.expected.npz", allow_pickle=False)


def torch_bits(t: torch.Tensor, dtype: str) -> np.ndarray:
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(width).numpy().view({"F64": np.uint64, "F32": np.uint32}.get(dtype, np.uint16))


def assert_same_bits(got: np.ndarray, want: np.ndarray, what: str):
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    assert bad.size == 0, f"{what}: {bad.size} of {want.size} values differ (first at {bad[:5]})"


@pytest.mark.parametrize("dtype,as_dtype", CASES)
def test_spec_reader_reproduces_the_numpy_expected_values(dtype, as_dtype):
    """The stored files, read from the spec alone, give what numpy computed from the raw trajectory."""
    store, want = SpecStore(GOLDEN / f"{dtype.lower()}.ctraj"), expected(dtype)
    assert store.ids == list(want["ids"]) == [3, 10]
    for p in range(2):
        np.testing.assert_allclose(store.beta(p), want[f"beta_{p}"], rtol=1e-13, atol=0)
        for row, c in enumerate(want["points"]):
            flat = np.concatenate([to_bits(x, as_dtype).reshape(-1) for x in store.theta(p, float(c), as_dtype)])
            assert_same_bits(flat, want[f"theta_{p}_{as_dtype}"][row], f"spec reader, expert {p}, c={c}")


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                              reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,as_dtype", CASES)
def test_trajstore_gives_the_expected_values_bit_for_bit(dtype, as_dtype, device):
    import trajstore

    store, want = trajstore.open(GOLDEN / f"{dtype.lower()}.ctraj"), expected(dtype)
    assert store.expert_ids == [3, 10]
    request = None if as_dtype == dtype else TORCH[as_dtype]
    for p in range(2):
        e = store.expert(p)
        np.testing.assert_allclose(e.beta, want[f"beta_{p}"], rtol=1e-13, atol=0)
        for row, c in enumerate(want["points"]):
            flat = e.at(float(c), flat=True, dtype=request, device=device)
            assert flat.dtype == TORCH[as_dtype] and flat.device.type == device
            flat = flat.cpu()
            assert_same_bits(torch_bits(flat, as_dtype), want[f"theta_{p}_{as_dtype}"][row], f"expert {p}, c={c}")
            layers = {k: v.cpu() for k, v in e.at(float(c), dtype=request, device=device).items()}  # dict form
            joined = torch.cat([layers[name].reshape(-1) for name, _ in make_golden.LAYERS])
            assert_same_bits(torch_bits(joined, as_dtype), want[f"theta_{p}_{as_dtype}"][row], f"dict, c={c}")


def test_golden_stores_verify_and_anchors_are_exact():
    import trajstore

    for dtype in make_golden.DTYPES:
        store = trajstore.open(GOLDEN / f"{dtype.lower()}.ctraj")
        store.verify()
        spec = SpecStore(GOLDEN / f"{dtype.lower()}.ctraj")
        for p in range(2):
            for epoch in make_golden.ANCHORS:  # §7: theta(e_j) is the stored anchor, bit for bit
                got = store.expert(p).at(epoch)
                for (name, _), want in zip(make_golden.LAYERS, spec.anchor(p, epoch)):
                    assert_same_bits(torch_bits(got[name], dtype), to_bits(want, dtype), f"{name} at {epoch}")


@pytest.mark.parametrize("dtype", make_golden.DTYPES)
def test_a_store_written_today_reads_the_same_from_the_spec(tmp_path, dtype):
    """The writer of this checkout still writes what a spec reader understands, with the same numbers."""
    trajs = [make_golden.trajectory(dtype, seed) for seed in make_golden.IDS]
    make_golden.write_store(tmp_path / "today.ctraj", dtype, trajs)
    spec, want = SpecStore(tmp_path / "today.ctraj"), expected(dtype)
    for p in range(2):
        for row, c in enumerate(want["points"]):
            flat = np.concatenate([to_bits(x, dtype).reshape(-1) for x in spec.theta(p, float(c))])
            assert_same_bits(flat, want[f"theta_{p}_{dtype}"][row], f"today's store, expert {p}, c={c}")


# -- a generated store: layers on both sides of _FlatLerp.BIG (a multiply of their own, or one per-value
# factor for a run of small layers), and steps of different sizes per layer, so that at one c some layers
# are computed from x and others from y ----------------------------------------------------------------

MIXED_LAYERS = [("big", (70, 80)), ("tiny", (3,)), ("edge", (4096,)), ("mid", (1000,)), ("bias", (7,)),
                ("big2", (64, 80)), ("last", (2,))]


def mixed_trajectory(dtype: str) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    steps = [torch.linspace(0.2, 3.0, 8) ** p for p in (1, 3, 0.5, 2, 1, 4, 0.3)]  # per layer
    traj, params = [], [torch.randn(s, generator=g) for _, s in MIXED_LAYERS]
    for t in range(9):
        traj.append([p.clone() for p in params])
        params = [p + steps[i][min(t, 7)] * 0.01 * torch.randn(p.shape, generator=g) for i, p in enumerate(params)]
    for x, y in zip(traj[4], traj[8]):  # at c = K: y - 0*d is -0.0 where y = -0.0 and d > 0 (y + (+0)*d: +0.0)
        y.reshape(-1)[(x.reshape(-1) < 0).nonzero()[:2, 0]] = -0.0
    return [[t.to(TORCH[dtype]) for t in step] for step in traj]


@pytest.mark.parametrize("dtype,as_dtype", [("F32", "F32"), ("F32", "F16"), ("F32", "F64"), ("F16", "F16"),
                                            ("BF16", "F32"), ("BF16", "BF16")])
def test_flat_vectors_across_big_and_small_layers_are_the_spec_lerp(tmp_path, dtype, as_dtype):
    import trajstore
    from helpers import write_store

    traj = mixed_trajectory(dtype)
    layers = [(n, s, TORCH[dtype]) for n, s in MIXED_LAYERS]
    e = trajstore.open(write_store(tmp_path / "m.ctraj", [traj], layers=layers, waypoints=(4,))).expert(0)
    spec = SpecStore(tmp_path / "m.ctraj")
    request = None if as_dtype == dtype else TORCH[as_dtype]
    out, sides = torch.empty(e._s.num_params, dtype=TORCH[as_dtype]), set()
    for c in [0.0, 2.0, 4.0, 8.0, 3.999, 7.25, *np.random.default_rng(1).uniform(0, 8, 40)]:
        want = np.concatenate([to_bits(x, as_dtype).reshape(-1) for x in spec.theta(0, float(c), as_dtype)])
        sides.add(tuple(spec_reader.weights(spec.beta(0), spec.epochs, float(c))[1] < 0.5))
        for got in (e.at(float(c), flat=True, dtype=request), e.at(float(c), flat=True, dtype=request, out=out),
                    torch.cat([v.reshape(-1) for v in e.at(float(c), dtype=request).values()])):
            assert_same_bits(torch_bits(got, as_dtype), want, f"c={c}")
    assert any(len(set(s)) == 2 for s in sides)  # some c had layers on both sides of w = 0.5


def test_flat_vectors_read_by_threads_at_once_are_the_spec_lerp(tmp_path):
    """Expert.at(flat=True) on the CPU from four threads on one store: each point is still §7's. The factors
    go through a buffer per thread, and numpy lets go of the GIL inside each large multiply, where another
    thread refilling a shared buffer would change the factors of the layers still to come."""
    import threading

    import trajstore
    from helpers import write_store

    layers = [(n, s, TORCH["F32"]) for n, s in MIXED_LAYERS]
    path = write_store(tmp_path / "m.ctraj", [mixed_trajectory("F32")], layers=layers, waypoints=(4,))
    spec, cs = SpecStore(path), [float(c) for c in np.random.default_rng(2).uniform(0, 8, 16)]
    want = {c: np.concatenate([to_bits(x, "F32").reshape(-1) for x in spec.theta(0, c)]).tobytes() for c in cs}
    e, got, failed = trajstore.open(path).expert(0), {}, []

    def read(k):
        out = torch.empty(e._s.num_params)
        try:
            for _ in range(40):
                for c in cs[k::4]:  # half the threads into their own `out`, half into new vectors
                    point = e.at(c, flat=True, out=out) if k % 2 else e.at(c, flat=True)
                    got.setdefault(c, set()).add(torch_bits(point, "F32").tobytes())
        except Exception as exc:  # noqa: BLE001 (reported below, with the thread's failure)
            failed.append(exc)

    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failed and got == {c: {want[c]} for c in cs}


# -- the reference's arithmetic, checked against exact rational arithmetic -------------------------

PRECISION = {"F64": (53, -1021), "F32": (24, -125), "F16": (11, -13), "BF16": (8, -125)}


def exact_round(q: Fraction, dtype: str) -> Fraction:
    """q rounded to the nearest value of dtype, ties to even, by exact arithmetic."""
    if q == 0:
        return Fraction(0)
    bits, emin = PRECISION[dtype]
    e = abs(q.numerator).bit_length() - q.denominator.bit_length()  # 2^(e-1) <= |q| < 2^(e+1)
    e = e + 1 if abs(q) >= Fraction(2) ** e else e  # now 2^(e-1) <= |q| < 2^e, as frexp
    quantum = Fraction(2) ** (max(e, emin) - bits)
    return round(q / quantum) * quantum  # round() of a Fraction ties to even


def exact_lerp(x: float, y: float, w: float, dtype: str) -> Fraction:
    X, Y = Fraction(x), Fraction(y)
    d = exact_round(Y - X, dtype)
    if w < 0.5:
        return exact_round(X + exact_round(d * exact_round(Fraction(w), dtype), dtype), dtype)
    return exact_round(Y - exact_round(d * exact_round(1 - Fraction(w), dtype), dtype), dtype)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_the_reference_lerp_rounds_like_exact_arithmetic(dtype):
    """spec_reader's numpy arithmetic (and its bfloat16 emulation) is what §7 says, checked with Fractions."""
    g = np.random.default_rng(7)
    x = spec_reader.rnd(g.standard_normal(300).astype(np.float32) * 2.0 ** g.integers(-8, 4, 300), dtype)
    y = spec_reader.rnd(x.astype(np.float32) + 0.03 * g.standard_normal(300).astype(np.float32), dtype)
    for w in (0.0, 1e-5, 0.1234567891, 0.4999999, 0.5, 0.77777777, 0.9999, 1.0):
        got = spec_reader.lerp(x, y, w, dtype)
        want = [exact_lerp(float(a), float(b), w, dtype) for a, b in zip(x, y)]
        assert [Fraction(float(v)) for v in got] == want, f"w={w}"
    ends = spec_reader.lerp(x, y, 1.0, dtype)  # exact at both ends
    assert np.array_equal(ends, y) and np.array_equal(spec_reader.lerp(x, y, 0.0, dtype), x)



@pytest.mark.parametrize("dtype", ["F64", "F32", "F16"])
def test_the_flat_cpu_lerp_rounds_each_factor_once(dtype):
    """The factors of trajstore's numpy lerp come straight from float64 to the dtype: weights next to a tie
    of the dtype (where rounding through float32 first goes the wrong way for float16), from x = 0 to y = 1."""
    from trajstore.format.reader import _FlatLerp

    bits = PRECISION[dtype][0]
    ws = [0.0, 1.0, 0.5, 2.0**-30, 0.4999999999]
    for k in (0, 1):  # ties just below 0.5 and, as 1 - w, just above
        for tie in (0.25 + 2.0 ** (-2 - bits), 0.375 + 2.0 ** (-2 - bits)):  # half a unit in the last place
            for nudge in (0.0, 2.0**-50, -(2.0**-50)):
                ws.append(tie + nudge if k == 0 else (1.0 - tie) - nudge)
    numels = [1 if i % 2 else 4096 for i in range(len(ws))]  # both kinds of part
    carry = spec_reader.CARRY[dtype]
    x, y = np.zeros(sum(numels), dtype=carry), np.ones(sum(numels), dtype=carry)
    lerp, out = _FlatLerp(numels), np.empty_like(x)
    # it takes each weight from the nearer anchor: w below 0.5, else -(1 - w) (piece_weights' nearer=True)
    lerp(x, y, lerp.split(y - x), [w if w < 0.5 else -(1.0 - w) for w in ws], out, lerp.split(out))
    for v, w in zip(np.split(out, np.cumsum(numels)[:-1]), ws):
        assert len(set(v.tolist())) == 1 and Fraction(float(v[0])) == exact_lerp(0.0, 1.0, w, dtype), f"w={w!r}"

# -- §6: the single-file form ------------------------------------------------------------------------

@pytest.fixture
def single(tmp_path):
    """The golden F32 store with a writer's leftover hidden entries, in the single-file form."""
    from trajstore.format.singlefile import to_single_file

    src = tmp_path / "src.ctraj"
    shutil.copytree(GOLDEN / "f32.ctraj", src)
    leftover = src / "experts" / ".tmp-000004-1a2b3c4d"
    leftover.mkdir()
    (leftover / "zarr.json").write_text("{}")
    (src / ".DS_Store").write_bytes(b"junk")
    return src, to_single_file(src, tmp_path / "one.ctraj")


def test_single_file_members_are_stored_aligned_and_visible_only(single):
    import struct
    import zipfile

    src, path = single
    raw = path.read_bytes()
    assert raw[:4] == b"PK\x03\x04"
    want = sorted(str(p.relative_to(src)) for p in src.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts))
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        assert sorted(i.filename for i in infos) == want
        for info in infos:
            assert info.compress_type == zipfile.ZIP_STORED, info.filename
            # the local header (30 bytes + name + extra) precedes the data; its extra may differ from the
            # central directory's, so read the lengths from the local header itself
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            assert start % 64 == 0, f"{info.filename} data starts at {start}"
            assert raw[start : start + info.file_size] == (src / info.filename).read_bytes()


def test_single_file_reads_the_same_from_the_spec_zarr_and_trajstore(single):
    import zarr
    from zarr.storage import ZipStore

    import trajstore

    _, path = single
    want = expected("F32")
    spec = SpecStore(path)
    assert spec.src.zip is not None and spec.ids == [3, 10]
    for row, c in enumerate(want["points"]):
        flat = np.concatenate([to_bits(x, "F32").reshape(-1) for x in spec.theta(1, float(c))])
        assert_same_bits(flat, want["theta_1_F32"][row], f"single file, c={c}")
        assert_same_bits(torch_bits(trajstore.open(path).expert(1).at(float(c), flat=True), "F32"),
                         want["theta_1_F32"][row], f"trajstore single file, c={c}")
    group = zarr.open_group(ZipStore(path, mode="r"), mode="r")
    assert group.attrs["trajstore"]["anchor_epochs"] == list(make_golden.ANCHORS)
    np.testing.assert_allclose(group["experts/000010/beta"][...], want["beta_1"], rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype,as_dtype", CASES)
def test_the_foreach_form_gpus_use_gives_the_same_bits(dtype, as_dtype):
    """Expert.at's GPU path (reader.lerp_layers, foreach kernels over all layers), run here on the CPU."""
    import trajstore
    from trajstore.format.reader import lerp_layers

    spec, want = SpecStore(GOLDEN / f"{dtype.lower()}.ctraj"), expected(dtype)
    e = trajstore.open(GOLDEN / f"{dtype.lower()}.ctraj").expert(1)
    for row, c in enumerate(want["points"]):
        j, w = spec_reader.weights(spec.beta(1), spec.epochs, float(c))
        a = [t.to(TORCH[as_dtype]).reshape(-1) for t in e.anchor(spec.epochs[j]).values()]
        b = [t.to(TORCH[as_dtype]).reshape(-1) for t in e.anchor(spec.epochs[j + 1]).values()]
        flat = torch.cat(lerp_layers(a, b, [float(x) for x in w]))
        assert_same_bits(torch_bits(flat, as_dtype), want[f"theta_1_{as_dtype}"][row], f"foreach, c={c}")
