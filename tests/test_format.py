"""The .ctraj format: round trips, Eq. 9/10 semantics, both storage forms, zarr interoperability."""

import json

import numpy as np
import pytest
import torch
import zarr
from helpers import SMALL_LAYERS, random_walk, write_store
from safetensors.torch import load_file

import trajstore
from trajstore.format.singlefile import to_directory, to_single_file


@pytest.fixture
def store(tmp_path):
    trajs = [random_walk(seed=s) for s in range(3)]
    return write_store(tmp_path / "a.ctraj", trajs, waypoints=(3, 7)), trajs


def test_table_and_metadata(store):
    path, trajs = store
    r = trajstore.open(path)
    assert r.num_experts == 3 and r.num_timesteps == 11 and len(r) == 3
    assert r.anchor_epochs == (0, 3, 7, 10)
    assert [(l.name, l.shape) for l in r.layers] == SMALL_LAYERS
    assert r.num_params == sum(torch.Size(s).numel() for _, s in SMALL_LAYERS)


def test_anchors_round_trip_bit_exactly(store):
    path, trajs = store
    r = trajstore.open(path)
    for i, traj in enumerate(trajs):
        for epoch in r.anchor_epochs:
            got = r.expert(i).anchor(epoch)
            for (name, _), want in zip(SMALL_LAYERS, traj[epoch]):
                assert torch.equal(got[name], want)
                assert got[name].dtype == want.dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_round_trip(tmp_path, dtype):
    layers = [(n, s, dtype) for n, s in SMALL_LAYERS]
    traj = random_walk(dtype=dtype)
    r = trajstore.open(write_store(tmp_path / "d.ctraj", [traj], layers=layers))
    e = r.expert(0)
    assert all(torch.equal(a, b) for a, b in zip(e.anchor(10).values(), traj[10]))
    assert e.at(2.5, flat=True).dtype == dtype
    assert e.at(2.5, flat=True, dtype=torch.float32).dtype == torch.float32


def test_anchor_files_are_plain_safetensors_checkpoints(store):
    path, trajs = store
    sd = load_file(path / "experts" / "000001" / "anchor_0007.safetensors")
    assert list(sd) == sorted(n for n, _ in SMALL_LAYERS) or set(sd) == {n for n, _ in SMALL_LAYERS}
    assert torch.equal(sd["fc.weight"], trajs[1][7][2])


def test_beta_is_monotone_from_zero_to_one_per_piece(store):
    path, _ = store
    e = trajstore.open(path).expert(0)
    beta = e.beta
    epochs = e.anchor_epochs
    for a, b in zip(epochs, epochs[1:]):
        piece = np.vstack([beta[a:b], np.ones((1, beta.shape[1]))])
        assert np.all(piece[0] == 0)
        assert np.all(np.diff(piece, axis=0) >= 0)
        assert np.all(piece[-1] == 1)


def test_beta_matches_eq9_from_the_original_trajectory(store):
    path, trajs = store
    e = trajstore.open(path).expert(2)
    traj = trajs[2]
    for layer in range(len(SMALL_LAYERS)):
        steps = [float(torch.linalg.vector_norm(traj[t + 1][layer].double() - traj[t][layer].double()))
                 for t in range(10)]
        np.testing.assert_allclose(e.step_norms[:, layer], steps, rtol=1e-12)
        for a, b in [(0, 3), (3, 7), (7, 10)]:
            total = sum(steps[a:b])
            for t in range(a + 1, b):
                assert e.beta[t, layer] == pytest.approx(sum(steps[a:t]) / total, rel=1e-12)


def test_integer_points_follow_eq8_layer_by_layer(store):
    path, trajs = store
    e = trajstore.open(path).expert(1)
    epochs = e.anchor_epochs
    for t in range(11):
        j = max(i for i, a in enumerate(epochs[:-1]) if a <= t)
        a, b = epochs[j], epochs[j + 1]
        point = e.at(t)
        for layer, (name, _) in enumerate(SMALL_LAYERS):
            beta = 1.0 if t == b else e.beta[t, layer]
            want = (1 - beta) * trajs[1][a][layer].double() + beta * trajs[1][b][layer].double()
            torch.testing.assert_close(point[name].double(), want, rtol=1e-6, atol=1e-6)


def test_real_c_interpolates_beta_then_parameters(store):
    path, trajs = store
    e = trajstore.open(path).expert(0)
    c = 4.25  # piece (3, 7)
    beta = 0.75 * e.beta[4] + 0.25 * e.beta[5]
    point = e.at(c)
    for layer, (name, _) in enumerate(SMALL_LAYERS):
        want = (1 - beta[layer]) * trajs[0][3][layer].double() + beta[layer] * trajs[0][7][layer].double()
        torch.testing.assert_close(point[name].double(), want, rtol=1e-6, atol=1e-6)


def test_at_is_continuous_in_c_including_across_anchors(store):
    path, _ = store
    e = trajstore.open(path).expert(0)
    for c in [0.0, 1.0, 2.999999, 3.0, 5.5, 6.9999999, 7.0, 9.99999, 10.0]:
        lo, hi = e.at(max(c - 1e-7, 0), flat=True), e.at(min(c + 1e-7, 10), flat=True)
        assert (lo - hi).abs().max() < 1e-4
    for epoch in e.anchor_epochs:  # approaching an inner anchor from below lands on it
        near = e.at(max(epoch - 1e-9, 0), flat=True)
        torch.testing.assert_close(near, e.at(epoch, flat=True))


def test_flat_is_parameter_order_concatenation(store):
    path, _ = store
    e = trajstore.open(path).expert(2)
    d = e.at(5.3)
    torch.testing.assert_close(e.at(5.3, flat=True), torch.cat([d[n].reshape(-1) for n, _ in SMALL_LAYERS]))


def test_window_pairs_start_and_clamped_target(store):
    path, _ = store
    e = trajstore.open(path).expert(0)
    start, target = e.window(2.5, 3.25, flat=True)
    torch.testing.assert_close(start, e.at(2.5, flat=True))
    torch.testing.assert_close(target, e.at(5.75, flat=True))
    _, end = e.window(8.0, 6, flat=True)
    assert torch.equal(end, e.at(10, flat=True))


def test_results_are_fresh_tensors(store):
    path, _ = store
    e = trajstore.open(path).expert(0)
    first = e.at(3)
    first["fc.bias"].add_(100.0)
    assert not torch.equal(e.at(3)["fc.bias"], first["fc.bias"])


def test_single_file_form_reads_identically(store, tmp_path):
    path, _ = store
    single = to_single_file(path, tmp_path / "one.ctraj")
    assert single.is_file()
    a, b = trajstore.open(path), trajstore.open(single)
    assert b.num_experts == 3 and b.anchor_epochs == a.anchor_epochs
    for c in [0, 2.2, 7, 9.9]:
        assert torch.equal(a.expert(1).at(c, flat=True), b.expert(1).at(c, flat=True))
    np.testing.assert_array_equal(a.expert(2).beta, b.expert(2).beta)
    b.verify()
    back = to_directory(single, tmp_path / "back.ctraj")
    assert torch.equal(trajstore.open(back).expert(0).at(4.5, flat=True), a.expert(0).at(4.5, flat=True))


def test_single_file_written_directly(tmp_path):
    traj = random_walk()
    out = write_store(tmp_path / "s.ctraj", [traj], single_file=True)
    assert out.is_file() and not list(tmp_path.glob(".*"))
    assert torch.equal(trajstore.open(out).expert(0).anchor(10)["fc.bias"], traj[10][3])


def test_any_zarr_reader_sees_group_attributes_and_betas(store):
    path, _ = store
    g = zarr.open_group(str(path), mode="r")
    meta = g.attrs["trajstore"]
    assert meta["format"] == "ctraj" and meta["version"] == trajstore.FORMAT_VERSION
    beta = g["experts/000001/beta"][...]
    np.testing.assert_array_equal(beta, trajstore.open(path).expert(1).beta)
    assert json.loads((path / "zarr.json").read_text())["node_type"] == "group"


def test_betas_can_be_recomputed_for_other_anchors(store):
    path, trajs = store
    e = trajstore.open(path).expert(0)
    two = trajstore.beta_from_norms(e.step_norms, (0, 10))
    norms = e.step_norms
    np.testing.assert_allclose(two[4], norms[:4].sum(0) / norms.sum(0))


def test_constant_layer_gets_linear_schedule(tmp_path):
    traj = random_walk()
    for t in traj:
        t[1] = traj[0][1].clone()
    e = trajstore.open(write_store(tmp_path / "c.ctraj", [traj])).expert(0)
    np.testing.assert_allclose(e.beta[:, 1], np.arange(11) / 10)
    assert torch.equal(e.at(4.4)["conv.bias"], traj[0][1])


def test_mct_smoothing_stores_smoothed_anchors(tmp_path):
    traj = random_walk()
    e = trajstore.open(write_store(tmp_path / "m.ctraj", [traj], waypoints=(4,), smoothing="mct")).expert(0)
    want4 = [0.5 * traj[4][i] + 0.25 * traj[3][i] + 0.25 * traj[5][i] for i in range(4)]
    want10 = [0.5 * traj[10][i] + 0.25 * traj[8][i] + 0.25 * traj[9][i] for i in range(4)]
    for i, (name, _) in enumerate(SMALL_LAYERS):
        torch.testing.assert_close(e.anchor(4)[name], want4[i])
        torch.testing.assert_close(e.anchor(10)[name], want10[i])
        assert torch.equal(e.anchor(0)[name], traj[0][i])


def test_flat_into_preallocated_out(store):
    path, _ = store
    e = trajstore.open(path).expert(1)
    buf = torch.empty(trajstore.open(path).num_params)
    assert e.at(6.6, flat=True, out=buf) is buf
    assert torch.equal(buf, e.at(6.6, flat=True))
    with pytest.raises(trajstore.TrajstoreError, match="out must be"):
        e.at(1, flat=True, out=torch.empty(3))


def test_a_reused_out_is_checked_again_when_it_changed(store):
    """The `out` of the last call is recognised in a few comparisons; one changed since (autograd, shape,
    memory, dtype) is checked in full again, never written through a stale numpy view."""
    path, _ = store
    r = trajstore.open(path)
    e, n = r.expert(1), r.num_params
    want = e.at(6.6, flat=True)
    buf = torch.empty(n)
    assert e.at(6.6, flat=True, out=buf) is buf and torch.equal(buf, want)
    buf.requires_grad_(True)
    with pytest.raises(trajstore.TrajstoreError, match="out must not require grad"):
        e.at(6.6, flat=True, out=buf)
    buf.requires_grad_(False)
    buf.resize_(n - 1)  # the same memory, one value shorter
    with pytest.raises(trajstore.TrajstoreError, match="out must be a torch.float32 vector"):
        e.at(6.6, flat=True, out=buf)
    buf.resize_(n)
    buf.set_(torch.zeros(2 * n)[n:])  # other memory: written there
    assert e.at(6.6, flat=True, out=buf) is buf and torch.equal(buf, want)
    buf.data = buf.detach().view(torch.int32)  # the same memory and shape, another dtype
    with pytest.raises(trajstore.TrajstoreError, match="out must be a torch.float32 vector"):
        e.at(6.6, flat=True, out=buf)


def test_outs_at_the_same_address_and_strided_outs_get_the_right_values(store):
    """at() keeps numpy views of flat vectors by address (a reused `out`, a new vector in recycled memory):
    another dtype at the same address, a strided `out`, two `out`s taking turns all get the spec's point."""
    path, _ = store
    r = trajstore.open(path)
    e, n = r.expert(0), r.num_params
    want32, want64 = e.at(6.6, flat=True), e.at(6.6, flat=True, dtype=torch.float64)
    memory = torch.zeros(n, dtype=torch.float64)
    as32 = memory.view(torch.float32)[:n]  # the first half of the same bytes, as float32
    assert e.at(6.6, flat=True, out=as32) is as32 and torch.equal(as32, want32)
    assert e.at(6.6, flat=True, dtype=torch.float64, out=memory) is memory and torch.equal(memory, want64)
    whole = torch.zeros(2 * n)
    strided = whole[::2]  # a vector of n values, every other one of its memory
    assert e.at(6.6, flat=True, out=strided) is strided and torch.equal(strided, want32)
    assert not whole[1::2].any()  # the values between are left alone
    start, target = torch.empty(n), torch.empty(n)
    for c in (1.5, 2.5, 6.6, 9.0):
        e.at(c, flat=True, out=start), e.at(min(c + 1, 10), flat=True, out=target)
        assert torch.equal(start, e.at(c, flat=True)) and torch.equal(target, e.at(min(c + 1, 10), flat=True))
    assert len(r._views.__dict__) <= 8


# -- §1 expert enumeration ---------------------------------------------------------------------------

def test_experts_are_enumerated_by_id_ignoring_hidden_and_other_entries(tmp_path):
    from spec_reader import SpecStore

    # written out of order, with gaps, and with a 7-digit id that sorts before 200000 as a string
    trajs = {5: random_walk(seed=5), 1_000_000: random_walk(seed=1), 2: random_walk(seed=2), 200_000: random_walk(seed=3)}
    path = tmp_path / "ids.ctraj"
    with trajstore.create(path, SMALL_LAYERS, 11, waypoints=(4,)) as w:
        for expert_id, traj in trajs.items():
            w.write_expert(traj, index=expert_id)
    experts = path / "experts"
    for junk in (".tmp-000003-1a2b3c4d", "notes", "000004"):  # a writer's leftover, a non-digit name, no zarr.json
        (experts / junk).mkdir()
    (experts / ".tmp-000003-1a2b3c4d" / "zarr.json").write_text("{}")
    (experts / "notes" / "zarr.json").write_text("{}")
    (experts / "README").write_text("not an expert")
    r = trajstore.open(path)
    ids = [2, 5, 200_000, 1_000_000]
    assert (experts / "1000000").is_dir() and (experts / "200000").is_dir()
    assert r.expert_ids == ids and len(r) == 4 and SpecStore(path).ids == ids
    for position, expert_id in enumerate(ids):  # the position is the index in id order
        e = r.expert(position)
        assert (e.position, e.id) == (position, expert_id)
        assert all(torch.equal(e.anchor(4)[n], t) for (n, _), t in zip(SMALL_LAYERS, trajs[expert_id][4]))
    r.verify()


# -- reading onto a device and dtype; the anchor cache -----------------------------------------------

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                              reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, None])
def test_reading_onto_a_device_and_dtype(store, device, dtype):
    from spec_reader import SpecStore, to_bits

    path, trajs = store
    e = trajstore.open(path).expert(2)
    spec = SpecStore(path)
    name = {torch.float64: "F64", torch.float16: "F16", None: "F32"}[dtype]
    want_dtype = dtype or torch.float32
    for c in (0.0, 2.6, 3.0, 8.25, 10.0):
        want = np.concatenate([to_bits(x, name).reshape(-1) for x in spec.theta(2, c, name)])
        flat = e.at(c, flat=True, device=device, dtype=dtype)
        assert flat.device.type == device and flat.dtype == want_dtype
        width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()]
        assert np.array_equal(flat.cpu().view(width).numpy().view(want.dtype), want), c
        layers = e.at(c, device=device, dtype=dtype)
        assert all(t.device.type == device and t.dtype == want_dtype for t in layers.values())
        out = torch.empty(e._s.num_params, device=device, dtype=want_dtype)
        assert e.at(c, flat=True, device=device, dtype=dtype, out=out) is out and torch.equal(out, flat)
    anchor = e.anchor(7, device=device, dtype=dtype)
    for (n, _), t in zip(SMALL_LAYERS, trajs[2][7]):
        assert anchor[n].device.type == device and torch.equal(anchor[n].cpu(), t.to(want_dtype))
    start, target = e.window(1.5, 2, flat=True, device=device, dtype=dtype)
    assert start.device.type == target.device.type == device and torch.equal(target, e.at(3.5, flat=True,
                                                                                              device=device, dtype=dtype))


@pytest.fixture
def decodes(monkeypatch):
    """Counts anchor files decoded: every read that the cache did not serve."""
    from trajstore.format import anchorfile

    calls = []
    real = anchorfile.decode
    monkeypatch.setattr(anchorfile, "decode", lambda buf, layers, where: calls.append(str(where)) or real(buf, layers, where))
    return calls


def test_cache_serves_repeated_reads_and_keys_by_expert_epoch_device_dtype(store, decodes):
    path, trajs = store
    r = trajstore.open(path)
    e0, e1 = r.expert(0), r.expert(1)
    first = e0.at(5.5, flat=True)
    assert len(decodes) == 2  # anchors 3 and 7
    assert torch.equal(e0.at(5.5, flat=True), first) and len(decodes) == 2
    # the same epochs of another expert, and the same anchors in another dtype, are other entries
    assert torch.equal(e1.anchor(3)["fc.bias"], trajs[1][3][3]) and len(decodes) == 3
    as64 = e0.at(5.5, flat=True, dtype=torch.float64)
    assert as64.dtype == torch.float64 and len(decodes) == 5
    torch.testing.assert_close(as64.float(), first, rtol=1e-6, atol=1e-6)
    assert torch.equal(e0.anchor(3)["fc.bias"], trajs[0][3][3]) and len(decodes) == 5


def test_cache_evicts_least_recently_used_beyond_cache_bytes(store, decodes):
    path, trajs = store
    plain = trajstore.open(path).expert(0)
    want = {c: plain.at(c, flat=True).clone() for c in (1.5, 5.5)}
    one = plain._s.num_params * 4  # one float32 anchor
    r = trajstore.open(path, cache_bytes=2 * one)
    e = r.expert(0)
    decodes.clear()
    assert torch.equal(e.at(1.5, flat=True), want[1.5]) and len(decodes) == 2  # anchors 0, 3
    assert torch.equal(e.anchor(0)["fc.bias"], trajs[0][0][3]) and len(decodes) == 2  # a hit: 0 is the newest
    assert torch.equal(e.anchor(7)["fc.bias"], trajs[0][7][3]) and len(decodes) == 3  # evicts 3, not 0
    assert torch.equal(e.anchor(0)["fc.bias"], trajs[0][0][3]) and len(decodes) == 3
    assert torch.equal(e.at(5.5, flat=True), want[5.5]) and len(decodes) == 5  # 3 again (evicting 7), then 7
    assert r._cached <= 2 * one
    tiny = trajstore.open(path, cache_bytes=0)  # keeps only the newest entry, and stays correct
    decodes.clear()
    for _ in range(2):
        assert torch.equal(tiny.expert(0).at(1.5, flat=True), want[1.5])
    assert len(decodes) == 4


def test_cache_order_counts_the_repeated_reads_of_a_piece(store, decodes):
    """Reading the piece an expert read last is answered without touching the cache's keys (_piece's slot),
    yet counts as a use: eviction stays least recently used first, and an evicted piece is read again."""
    path, _ = store
    want = {(i, c): trajstore.open(path).expert(i).at(c, flat=True).clone() for i in range(3) for c in (1.5, 2.5)}
    one = trajstore.open(path).num_params * 4  # an anchor, or a piece's y - x
    r = trajstore.open(path, cache_bytes=6 * one)  # two pieces of three entries
    e0, e1, e2 = r.expert(0), r.expert(1), r.expert(2)
    decodes.clear()
    assert torch.equal(e0.at(1.5, flat=True), want[0, 1.5]) and torch.equal(e1.at(1.5, flat=True), want[1, 1.5])
    assert len(decodes) == 4
    assert torch.equal(e0.at(2.5, flat=True), want[0, 2.5])  # from the slot: expert 0's piece is now the newest
    assert torch.equal(e2.at(1.5, flat=True), want[2, 1.5]) and len(decodes) == 6  # pushes out expert 1's
    assert torch.equal(e0.at(1.5, flat=True), want[0, 1.5]) and len(decodes) == 6  # still held
    assert torch.equal(e1.at(2.5, flat=True), want[1, 2.5]) and len(decodes) == 8  # read again, not a stale slot
    assert r._cached <= 6 * one
    for _ in range(3000):  # a long run of slot reads keeps its queue of uses short
        e1.at(2.5, flat=True)
    assert len(r._touched) <= 1025


def test_a_new_flat_vector_is_the_callers_alone(store):
    """at(flat=True) without out= keeps no view of the vector it returns (a view would keep it alive)."""
    import gc
    import weakref

    path, _ = store
    r = trajstore.open(path)
    for dtype in (None, torch.bfloat16):  # the numpy path and the per-layer torch path
        point = r.expert(0).at(1.5, flat=True, dtype=dtype)
        gone = weakref.ref(point)
        del point
        gc.collect()
        assert gone() is None and r.num_params > 0, dtype  # the store lives on
    # nor a numpy view of its memory that refers to it (which would not stop the tensor going)
    assert all(array.base.__class__ is not torch.Tensor for array, _ in r._views.__dict__.values())


def test_cache_holds_each_piece_difference_beside_its_anchors_within_cache_bytes(store, decodes):
    """A flat CPU point also keeps y - x of its piece (one anchor's bytes); it counts in cache_bytes, never
    pushes out its own anchors, and is not kept where the cache cannot hold all three."""
    path, _ = store
    want = {c: trajstore.open(path).expert(0).at(c, flat=True).clone() for c in (1.5, 2.5, 5.5)}
    one = trajstore.open(path).num_params * 4  # one float32 anchor, or one difference
    r = trajstore.open(path, cache_bytes=3 * one)
    e = r.expert(0)
    decodes.clear()
    assert torch.equal(e.at(1.5, flat=True), want[1.5]) and len(decodes) == 2 and r._cached == 3 * one
    assert torch.equal(e.at(2.5, flat=True), want[2.5]) and len(decodes) == 2  # all three held
    assert torch.equal(e.at(5.5, flat=True), want[5.5]) and len(decodes) == 3  # 7 pushes out 0, (3, 7) the old difference
    assert r._cached == 3 * one and len(r._cache) == 3
    assert torch.equal(e.at(5.5, flat=True), want[5.5]) and len(decodes) == 3
    small = trajstore.open(path, cache_bytes=2 * one)  # room for the anchors only: y - x is made per call
    decodes.clear()
    for c in (1.5, 2.5, 1.5):
        assert torch.equal(small.expert(0).at(c, flat=True), want[c])
    assert len(decodes) == 2 and small._cached == 2 * one and len(small._cache) == 2
