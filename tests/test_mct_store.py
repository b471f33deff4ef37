"""The official MCT code's waypoint/step stores (trajstore.legacy.mct), on small hand-made files whose every
expected number is worked out here: dyadic betas and integer waypoints, so each interpolated value is
exact in float32 and compared bit for bit (docs/legacy-formats.md §5). Also every refusal, word for word."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from trajstore.errors import DegenerateTrajectoryError, FormatError
from trajstore.legacy import open_buffer

NAMES = ["w", "b"]
EPOCHS = (0, 2, 5)  # pieces [0, 2] (3 points) and [2, 5] (4 points)

# per expert, per piece, per point: the two tensors' betas. Expert 2 starts its pieces off 0 and ends off 1,
# so that a waypoint epoch read by interpolation instead of as the stored waypoint shows.
BETAS = [
    [[[0.0, 0.0], [0.25, 0.75], [1.0, 1.0]], [[0.0, 0.0], [0.5, 0.125], [0.75, 0.5], [1.0, 1.0]]],
    [[[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]], [[0.0, 0.0], [0.25, 0.25], [0.875, 0.625], [1.0, 1.0]]],
    [[[0.25, 0.5], [0.125, 0.375], [1.0, 1.0]], [[0.125, 0.25], [0.375, 0.75], [0.625, 0.25], [0.75, 1.0]]],
]


def waypoint(e: int, k: int) -> list[torch.Tensor]:
    """Waypoint k of expert e: small integers, different per expert, waypoint and element."""
    return [torch.arange(6, dtype=torch.float32).reshape(2, 3) * (k + 1) + 8 * e + 4 * k * k,
            torch.tensor([8.0 * k + e, -4.0 * k - 2 * e])]


def as_steps(pieces, layout="tensor"):
    """Betas as MCT stores them (0-d float32 tensors), or as Python floats/ints ("python")."""
    conv = {"tensor": lambda v: torch.tensor(v, dtype=torch.float32),
            "python": lambda v: int(v) if v in (0.0, 1.0) else v}[layout]
    return [[[conv(v) for v in point] for point in piece] for piece in pieces]


def save_pair(d, n, experts, steps=None, **save):
    d.mkdir(parents=True, exist_ok=True)
    torch.save([[waypoint(e, k) for k in range(len(EPOCHS))] for e in experts], d / f"waypoint_buffer_{n}.pt", **save)
    torch.save(steps if steps is not None else [as_steps(BETAS[e]) for e in experts], d / f"step_buffer_{n}.pt", **save)


@pytest.fixture
def store(tmp_path):
    d = tmp_path / "mct"
    save_pair(d, 0, [0, 1])
    save_pair(d, 1, [2])
    return d


def by_hand(e: int, t: int) -> list[torch.Tensor]:
    """theta(t) of expert e: the stored waypoint at a waypoint epoch, else a + beta (b - a) (exact here)."""
    if t in EPOCHS:
        return waypoint(e, EPOCHS.index(t))
    p = 0 if t < EPOCHS[1] else 1
    a, b, betas = waypoint(e, p), waypoint(e, p + 1), BETAS[e][p][t - EPOCHS[p]]
    return [(x.double() + w * (y.double() - x.double())).float() for x, y, w in zip(a, b, betas)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def test_hand_made_pairs_read_point_by_point(store):
    buf = open_buffer(store, architecture=NAMES)
    assert (buf.kind, buf.num_experts, buf.num_timesteps, buf.anchor_epochs) == ("waypoint_buffer", 3, 6, EPOCHS)
    assert [layer.name for layer in buf.layers] == NAMES and [layer.shape for layer in buf.layers] == [(2, 3), (2,)]
    assert [f.name for f in buf.files] == ["waypoint_buffer_0.pt", "step_buffer_0.pt",
                                           "waypoint_buffer_1.pt", "step_buffer_1.pt"]
    assert [buf.file_of(i).name for i in range(3)] == ["waypoint_buffer_0.pt"] * 2 + ["waypoint_buffer_1.pt"]
    assert [buf.source_of(i) for i in range(3)] == [
        {"file": "waypoint_buffer_0.pt", "steps": "step_buffer_0.pt", "index": 0},
        {"file": "waypoint_buffer_0.pt", "steps": "step_buffer_0.pt", "index": 1},
        {"file": "waypoint_buffer_1.pt", "steps": "step_buffer_1.pt", "index": 0}]
    # back and forth between the files, so each read may need the other pair loaded
    for e, t in [(2, 1), (0, 3), (2, 4), (1, 1), (0, 0), (2, 2), (1, 5), (2, 5), (0, 4), (2, 0), (1, 2), (2, 3)]:
        assert same(buf.timestep(e, t), by_hand(e, t)), (e, t)
    for e in range(3):
        assert all(same(got, by_hand(e, t)) for t, got in enumerate(buf.trajectory(e)))
        assert len(buf.trajectory(e)) == 6
        assert all(same(got, waypoint(e, k)) for k, got in enumerate(buf.waypoints(e)))
        # the .ctraj convention: each piece's points but its last, then the very last point
        want = [BETAS[e][0][0], BETAS[e][0][1], BETAS[e][1][0], BETAS[e][1][1], BETAS[e][1][2], BETAS[e][1][3]]
        got = buf.betas(e)
        assert got.dtype.name == "float64" and got.tolist() == want


def test_what_is_handed_out_is_a_copy_of_the_lists(store):
    buf = open_buffer(store, architecture=NAMES)
    buf.timestep(0, 2).append("junk")
    buf.waypoints(0)[1].append("junk")
    buf.waypoints(0).append("junk")
    buf.trajectory(0)[0].append("junk")
    assert same(buf.timestep(0, 2), waypoint(0, 1)) and same(buf.timestep(0, 0), waypoint(0, 0))
    assert len(buf.waypoints(0)) == 3 and all(same(got, waypoint(0, k)) for k, got in enumerate(buf.waypoints(0)))


def test_two_waypoints_have_no_piece_level_and_betas_may_be_python_numbers(tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    flat = [[0, 0], [0.25, 0.5], [0.5, 0.75], [1, 1]]  # ints at the ends, floats, one 1-element tensor
    flat[2][1] = torch.tensor([0.75])
    torch.save([[waypoint(0, 0), waypoint(0, 2)]], d / "waypoint_buffer_0.pt")
    torch.save([flat], d / "step_buffer_0.pt")
    buf = open_buffer(d, architecture=NAMES)
    assert (buf.num_timesteps, buf.anchor_epochs) == (4, (0, 3))
    a, b = waypoint(0, 0), waypoint(0, 2)
    for t, betas in [(1, (0.25, 0.5)), (2, (0.5, 0.75))]:
        assert same(buf.timestep(0, t), [(x.double() + w * (y.double() - x.double())).float()
                                          for x, y, w in zip(a, b, betas)])
    assert same(buf.timestep(0, 0), a) and same(buf.timestep(0, 3), b)
    assert buf.betas(0).tolist() == [[0, 0], [0.25, 0.5], [0.5, 0.75], [1, 1]]


def test_pieces_of_two_points_are_fine(tmp_path):
    """Waypoints at consecutive epochs: a piece holds just its two ends (both of its stored waypoints)."""
    d = tmp_path / "short"
    d.mkdir()
    wps = [waypoint(0, 0), waypoint(0, 1), waypoint(0, 2)]
    torch.save([wps], d / "waypoint_buffer_0.pt")
    torch.save([[[[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.5, 0.25], [1.0, 1.0]]]], d / "step_buffer_0.pt")
    buf = open_buffer(d, architecture=NAMES)
    assert (buf.num_timesteps, buf.anchor_epochs) == (4, (0, 1, 3))
    assert [same(buf.timestep(0, t), wps[k]) for t, k in ((0, 0), (1, 1), (3, 2))] == [True] * 3
    assert same(buf.timestep(0, 2), [(x.double() + w * (y.double() - x.double())).float()
                                      for x, y, w in zip(wps[1], wps[2], (0.5, 0.25))])


def test_a_pre_zip_pair_warns_when_opened_and_reads_quietly(tmp_path):
    d = tmp_path / "old"
    save_pair(d, 0, [0], _use_new_zipfile_serialization=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # each warning counted, whatever was warned before in this process
        buf = open_buffer(d, architecture=NAMES)
    assert sum("pre-1.6 format" in str(w.message) for w in caught) == 2  # the waypoint and the step file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert same(buf.timestep(0, 3), by_hand(0, 3))
    assert not [w for w in caught if "pre-1.6" in str(w.message)]


def test_one_pair_is_loaded_at_a_time_and_only_when_needed(store, monkeypatch):
    from trajstore.legacy import loading

    buf = open_buffer(store, architecture=NAMES)
    loads, real_load = [], loading.load
    monkeypatch.setattr(loading, "load", lambda path, **kw: loads.append(path.name) or real_load(path, **kw))
    for e, t in [(0, 1), (1, 3), (0, 4), (1, 0), (2, 1), (2, 3), (0, 1)]:
        assert same(buf.timestep(e, t), by_hand(e, t))
    pair = lambda n: [f"waypoint_buffer_{n}.pt", f"step_buffer_{n}.pt"]  # noqa: E731
    assert loads == pair(0) + pair(1) + pair(0)


def test_a_rewritten_pair_is_noticed(store):
    """A same-count rewrite (other experts' numbers) of a file that is not loaded now is refused when read,
    and keeps being refused (the failed load leaves no half-loaded pair behind)."""
    buf = open_buffer(store, architecture=NAMES)
    assert same(buf.timestep(2, 1), by_hand(2, 1))  # pair 1 loaded
    save_pair(store, 0, [2, 2])  # still two experts of the same shapes
    for _ in range(2):
        with pytest.raises(FormatError) as err:
            buf.timestep(0, 1)
        assert str(err.value).startswith(f"{store / 'waypoint_buffer_0.pt'}: the file changed")
    assert same(buf.timestep(2, 3), by_hand(2, 3))  # the unchanged pair still reads


def test_a_beta_edited_in_place_with_its_time_stamp_restored_is_refused_when_read(store):
    """The stamp check cannot see an in-place edit that keeps size, inode and mtime: the betas of an
    expert are validated again when it is first read, so a NaN still never reaches the numbers."""
    import os

    buf = open_buffer(store, architecture=NAMES)
    assert same(buf.timestep(2, 1), by_hand(2, 1))  # pair 1 loaded, expert 0 never read
    path = store / "step_buffer_0.pt"
    st = os.stat(path)
    bad = store.parent / "edit" / path.name  # the same name: torch's zip records are named after the file
    bad.parent.mkdir()
    torch.save([steps_with(0, lambda s: s[1][1].__setitem__(0, torch.tensor(float("nan")))), as_steps(BETAS[1])], bad)
    assert bad.stat().st_size == st.st_size
    with open(path, "r+b") as f:
        f.write(bad.read_bytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(FormatError) as err:
        buf.timestep(0, 3)
    assert str(err.value) == (f"{path}: trajectory 0 of step_buffer_0.pt, piece 1, point 1 holds tensor(nan), "
                              "expected finite scalar betas")


def refusal(directory, exc=FormatError, when="opened") -> str:
    """The message of opening `directory` (when="opened") or of reading every expert in full after opening
    it (when="read"), which must fail with `exc`."""
    buf = None
    with pytest.raises(exc) as err:
        buf = open_buffer(directory, architecture=NAMES)
        for e in range(buf.num_experts):
            buf.trajectory(e)
    assert (buf is None) == (when == "opened"), f"refused when {'read' if buf else 'opened'}"
    assert type(err.value) is exc, repr(err.value)
    return str(err.value)


def steps_with(e, change):
    steps = as_steps(BETAS[e])
    change(steps)
    return steps


@pytest.mark.parametrize("name,change,message", [
    ("empty", lambda s: s.clear(), "trajectory 0 of step_buffer_0.pt is empty"),
    ("point not a list", lambda s: s[1].__setitem__(2, 0.5),
     "trajectory 0 of step_buffer_0.pt, piece 1, point 2 is a float, expected a list (the MTT layout: a list of "
     "trajectories, each a list of timesteps, each a list of parameter tensors)"),
    ("one piece", lambda s: s.pop(), "trajectory 0 of step_buffer_0.pt has 1 piece(s) for 3 waypoints"),
    ("three pieces", lambda s: s.append(s[1]), "trajectory 0 of step_buffer_0.pt has 3 piece(s) for 3 waypoints"),
    ("not a list", lambda s: s.__setitem__(1, 7), "trajectory 0 of step_buffer_0.pt, piece 1 is a int, expected a list (the MTT layout: a list of trajectories, "
     "each a list of timesteps, each a list of parameter tensors)"),
    ("few betas", lambda s: s[1][2].pop(), "trajectory 0 of step_buffer_0.pt, piece 1, point 2 holds 1 betas for 2 tensors"),
    ("many betas", lambda s: s[0][1].append(torch.tensor(0.5)),
     "trajectory 0 of step_buffer_0.pt, piece 0, point 1 holds 3 betas for 2 tensors"),
    ("nan", lambda s: s[1][1].__setitem__(0, float("nan")),
     "trajectory 0 of step_buffer_0.pt, piece 1, point 1 holds nan, expected finite scalar betas"),
    ("inf tensor", lambda s: s[0][0].__setitem__(1, torch.tensor(float("-inf"))),
     "trajectory 0 of step_buffer_0.pt, piece 0, point 0 holds tensor(-inf), expected finite scalar betas"),
    ("string", lambda s: s[1][3].__setitem__(1, "0.5"),
     "trajectory 0 of step_buffer_0.pt, piece 1, point 3 holds '0.5', expected finite scalar betas"),
])
def test_bad_step_entries_are_refused_word_for_word(tmp_path, name, change, message):
    d = tmp_path / "bad"
    save_pair(d, 0, [0], steps=[steps_with(0, change)])
    assert refusal(d) == f"{d / 'step_buffer_0.pt'}: {message}"


def test_a_trajectory_entry_that_is_not_a_list_is_refused(tmp_path):
    d = tmp_path / "bad"
    save_pair(d, 0, [0], steps=[7])
    assert refusal(d) == (f"{d / 'step_buffer_0.pt'}: trajectory 0 of step_buffer_0.pt is a int, expected a list "
                          "(the MTT layout: a list of trajectories, each a list of timesteps, each a list of "
                          "parameter tensors)")


def test_a_beta_tensor_of_two_values_is_refused(tmp_path):
    d = tmp_path / "bad"
    save_pair(d, 0, [0], steps=[steps_with(0, lambda s: s[1][1].__setitem__(0, torch.tensor([0.5, 0.5])))])
    assert re.fullmatch(re.escape(f"{d / 'step_buffer_0.pt'}: trajectory 0 of step_buffer_0.pt, piece 1, point 1 "
                                  "holds tensor([0.5000, 0.5000]), expected finite scalar betas"), refusal(d))


def test_a_piece_of_one_point_is_degenerate(tmp_path):
    d = tmp_path / "bad"
    save_pair(d, 0, [0], steps=[steps_with(0, lambda s: s.__setitem__(1, s[1][:1]))])
    assert refusal(d, DegenerateTrajectoryError) == (f"{d / 'step_buffer_0.pt'}: trajectory 0 of step_buffer_0.pt, "
                                                     "piece 1 has 1 point(s); a piece needs 2")


def test_pairs_that_do_not_fit_together_are_refused(tmp_path):
    d = tmp_path / "count"
    save_pair(d, 0, [0, 1], steps=[as_steps(BETAS[0])])
    assert refusal(d) == f"{d / 'step_buffer_0.pt'}: holds 1 trajectories, its waypoint file waypoint_buffer_0.pt 2"

    lists = "expected a list (the MTT layout: a list of trajectories, each a list of timesteps, each a list of " \
            "parameter tensors)"
    for name, waypoints, steps, bad, message in [
            ("no waypoints", [], [as_steps(BETAS[0])], "waypoint_buffer_0.pt", "holds no trajectories (an empty list)"),
            ("no steps", [[waypoint(0, k) for k in range(3)]], [], "step_buffer_0.pt",
             "holds no trajectories (an empty list)"),
            ("a tensor", [torch.zeros(3)], [as_steps(BETAS[0])], "waypoint_buffer_0.pt",
             f"trajectory 0 is a Tensor, {lists}")]:
        d = tmp_path / name
        d.mkdir()
        torch.save(waypoints, d / "waypoint_buffer_0.pt")
        torch.save(steps, d / "step_buffer_0.pt")
        assert refusal(d) == f"{d / bad}: {message}"

    d = tmp_path / "lonely"
    d.mkdir()
    torch.save([[waypoint(0, 0)]], d / "waypoint_buffer_0.pt")
    torch.save([[[0.0, 0.0], [1.0, 1.0]]], d / "step_buffer_0.pt")
    assert refusal(d, DegenerateTrajectoryError) == (f"{d / 'waypoint_buffer_0.pt'}: trajectory 0 has 1 waypoint(s); "
                                                     "it needs 2")

    d = tmp_path / "ragged"  # expert 1 of the second file has its inner waypoint at 3, not 2
    save_pair(d, 0, [0])
    save_pair(d, 1, [1, 2], steps=[as_steps(BETAS[1]), as_steps([BETAS[2][0] + [[0.5, 0.5]], BETAS[2][1][1:]])])
    assert refusal(d, DegenerateTrajectoryError) == (f"{d / 'step_buffer_1.pt'}: ragged store: trajectory 1 has "
                                                     "waypoints at epochs [0, 3, 5], the first at [0, 2, 5]")


def test_shapes_must_agree_across_trajectories_and_waypoints(tmp_path):
    d = tmp_path / "experts"
    save_pair(d, 0, [0])
    bigger = [[[t if j == 0 else torch.zeros(3) for j, t in enumerate(waypoint(1, k))] for k in range(3)]]
    torch.save(bigger, d / "waypoint_buffer_1.pt")
    torch.save([as_steps(BETAS[1])], d / "step_buffer_1.pt")
    assert refusal(d, DegenerateTrajectoryError) == (
        f"{d / 'waypoint_buffer_1.pt'}: trajectory 0 does not have the shapes of the first: "
        "tensor 1 is (3,) torch.float32 instead of (2,) torch.float32")

    d = tmp_path / "waypoints"
    save_pair(d, 0, [0, 1])
    wps = [[waypoint(e, k) for k in range(3)] for e in (0, 1)]
    wps[1][2] = [wps[1][2][0].double(), wps[1][2][1]]
    torch.save(wps, d / "waypoint_buffer_0.pt")
    assert refusal(d, DegenerateTrajectoryError) == (f"{d / 'waypoint_buffer_0.pt'}: trajectory 1: waypoint 2 "
                                                     "differs in shape from waypoint 0")

    d = tmp_path / "first"  # the first waypoint is the odd one out: measured against it, the others differ
    d.mkdir()
    wps = [waypoint(0, k) for k in range(3)]
    wps[0] = [wps[0][0][:1], wps[0][1]]
    torch.save([wps], d / "waypoint_buffer_0.pt")
    torch.save([as_steps(BETAS[0])], d / "step_buffer_0.pt")
    assert refusal(d, DegenerateTrajectoryError) == (f"{d / 'waypoint_buffer_0.pt'}: trajectory 0: waypoint 1 "
                                                     "differs in shape from waypoint 0")

    for k in (0, 2):
        d = tmp_path / f"no tensor {k}"
        d.mkdir()
        wps = [waypoint(0, n) for n in range(3)]
        wps[k] = [wps[k][0], "b"]
        torch.save([wps], d / "waypoint_buffer_0.pt")
        torch.save([as_steps(BETAS[0])], d / "step_buffer_0.pt")
        assert refusal(d) == f"{d / 'waypoint_buffer_0.pt'}: trajectory 0, waypoint {k}, entry 1 is a str, not a tensor"


def test_identical_waypoints_are_refused_when_read_and_a_repeat_is_not(tmp_path):
    d = tmp_path / "frozen"
    d.mkdir()
    still = waypoint(1, 0)
    torch.save([[waypoint(0, k) for k in range(3)], [still, [t.clone() for t in still], [t.clone() for t in still]]],
               d / "waypoint_buffer_0.pt")
    torch.save([as_steps(BETAS[0]), as_steps(BETAS[1])], d / "step_buffer_0.pt")
    buf = open_buffer(d, architecture=NAMES)  # opening reads the shapes only
    assert same(buf.timestep(0, 1), by_hand(0, 1))
    with pytest.raises(DegenerateTrajectoryError) as err:
        buf.timestep(1, 1)
    assert str(err.value) == f"{d / 'waypoint_buffer_0.pt'}: trajectory 1: all 3 waypoints are identical"

    d = tmp_path / "repeat"  # waypoints 0 and 1 equal, 2 not: a trajectory that moves in its second piece
    d.mkdir()
    wps = [waypoint(0, 0), [t.clone() for t in waypoint(0, 0)], waypoint(0, 2)]
    torch.save([wps], d / "waypoint_buffer_0.pt")
    torch.save([as_steps(BETAS[0])], d / "step_buffer_0.pt")
    buf = open_buffer(d, architecture=NAMES)
    assert same(buf.timestep(0, 1), wps[0]) and same(buf.timestep(0, 5), wps[2])


def test_tensors_are_named_from_the_directory_or_the_shapes_and_a_wrong_name_list_is_refused(tmp_path, legacy_layers):
    from helpers import random_walk
    from test_legacy import mct_store

    traj = random_walk(legacy_layers, 5)
    for name, source in (("ConvNetW4", "directory name"), ("mct", "inferred from shapes")):
        mct_store(tmp_path / name, [traj], (0, 2, 4))
        buf = open_buffer(tmp_path / name)
        assert [layer.name for layer in buf.layers] == [n for n, _ in legacy_layers]
        assert buf.architecture["source"] == source and buf.architecture["depth"] == 3
    with pytest.raises(FormatError) as err:
        open_buffer(tmp_path / "mct", architecture=["a", "b"])
    assert str(err.value).startswith(f"{tmp_path / 'mct'}: ")
