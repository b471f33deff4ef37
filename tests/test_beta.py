"""trajstore.format.beta against hand-worked numbers (docs/format.md §5 and §7 steps 1-3).

numpy only, no torch: fast enough to run once per mutant (docs/mutation-testing.md)."""

import math

import numpy as np
import pytest

from trajstore.errors import OutOfRangeError, TrajstoreError
from trajstore.format.beta import anchor_epochs_with, beta_from_norms, check_anchor_epochs, locate, piece_weights

# K = 4, two layers, anchors (0, 2, 4). Layer 0 steps 1, 2 | 3, 4; layer 1 does not move in the first
# piece (S = 0: linear schedule) and steps 0, 5 in the second (a zero step inside a moving piece).
NORMS = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 5.0]])
EPOCHS = (0, 2, 4)
BETA = np.array([[0.0, 0.0],
                 [1 / 3, 1 / 2],
                 [0.0, 0.0],
                 [3 / 7, 0 / 5],
                 [1.0, 1.0]])


def test_beta_by_hand():
    got = beta_from_norms(NORMS, EPOCHS)
    assert got.dtype == np.float64 and got.shape == (5, 2)
    np.testing.assert_allclose(got, BETA, rtol=1e-15, atol=0)
    # scale-free: pieces shorter than 1 in total are normalised the same way (no "total > 1" slip)
    np.testing.assert_allclose(beta_from_norms(NORMS * 1e-3, EPOCHS), BETA, rtol=1e-12, atol=0)


def test_beta_one_piece_and_many_pieces():
    norms = np.array([[2.0], [0.0], [6.0]])
    np.testing.assert_allclose(beta_from_norms(norms, (0, 3))[:, 0], [0, 0.25, 0.25, 1], rtol=1e-15, atol=0)
    np.testing.assert_array_equal(beta_from_norms(norms, (0, 1, 2, 3))[:, 0], [0, 0, 0, 1])
    frozen = np.zeros((4, 1))
    np.testing.assert_allclose(beta_from_norms(frozen, (0, 4))[:, 0], [0, 0.25, 0.5, 0.75, 1], rtol=1e-15, atol=0)
    np.testing.assert_allclose(beta_from_norms(frozen, (0, 1, 4))[:, 0], [0, 0, 1 / 3, 2 / 3, 1], rtol=1e-15, atol=0)


def test_beta_accepts_lists_and_other_float_types():
    got = beta_from_norms(NORMS.astype(np.float32).tolist(), list(EPOCHS))
    np.testing.assert_allclose(got, BETA, rtol=1e-15, atol=0)
    # §5 computes in float64 whatever the norms came in: float32 arithmetic would give 1/3 to 7 digits only
    for dtype in (np.float32, np.float16, np.int64):
        got = beta_from_norms(NORMS.astype(dtype), EPOCHS)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, BETA, rtol=1e-15, atol=0)


def test_beta_refuses_anchors_that_do_not_fit():
    with pytest.raises(TrajstoreError, match="end at K=4"):
        beta_from_norms(NORMS, (0, 2, 5))


def test_check_anchor_epochs():
    assert check_anchor_epochs([0, np.int64(3), 7], 8) == (0, 3, 7)
    assert type(check_anchor_epochs([0, np.int64(1)], 2)[1]) is int
    assert check_anchor_epochs((0, 1), 2) == (0, 1)
    for epochs, n, match in [((0,), 1, "at least 2 timesteps"), ((0, 0), 1, "at least 2 timesteps"),
                             ((0,), 3, "start at 0 and end at K=2"), ((1, 2), 3, "start at 0"),
                             ((0, 1), 3, "end at K=2"), ((0, 2, 2, 4), 5, "strictly increasing"),
                             ((0, 3, 2, 4), 5, "strictly increasing"), ((), 3, "start at 0")]:
        with pytest.raises(TrajstoreError, match=match):
            check_anchor_epochs(epochs, n)
    # the whole messages, word for word
    for epochs, n, message in [((0,), 1, "a trajectory needs at least 2 timesteps, got 1"),
                               ((1, 2), 3, "anchor epochs [1, 2] must start at 0 and end at K=2"),
                               ((0, 2, 2, 4), 5, "anchor epochs [0, 2, 2, 4] must be strictly increasing")]:
        with pytest.raises(TrajstoreError) as err:
            check_anchor_epochs(epochs, n)
        assert str(err.value) == message
    for epochs, n, message in [((0, "x"), 2, "anchor_epochs='x' must be an integer, not str"),
                               ((0, 1), "2", "num_timesteps='2' must be an integer, not str")]:
        with pytest.raises(TrajstoreError) as err:
            check_anchor_epochs(epochs, n)
        assert str(err.value) == message  # the argument named


def test_anchor_epochs_with_waypoints():
    assert anchor_epochs_with((6, 25), 51) == (0, 6, 25, 50)
    assert anchor_epochs_with([25, 6, 6], 51) == (0, 6, 25, 50)
    assert anchor_epochs_with((), 2) == (0, 1)
    assert anchor_epochs_with((1, 49), 51) == (0, 1, 49, 50)
    for bad in [(0,), (50,), (-1,), (51,), (6, 50)]:
        with pytest.raises(TrajstoreError, match=r"outside the open range \(0, 50\)"):
            anchor_epochs_with(bad, 51)
    with pytest.raises(TrajstoreError) as err:
        anchor_epochs_with((50, 6, 0), 51)
    assert str(err.value) == "waypoints [0, 50] lie outside the open range (0, 50)"
    # arguments of the wrong type are named in the message (the CLI passes these through)
    for args, message in [(((6, 25), "51"), "num_timesteps='51' must be an integer, not str"),
                          (((6, 25), None), "num_timesteps=None must be an integer, not NoneType"),
                          ((("a",), 51), "waypoints='a' must be an integer, not str"),
                          (((6.5,), 51), "waypoints=6.5 must be an integer, not float")]:
        with pytest.raises(TrajstoreError) as err:
            anchor_epochs_with(*args)
        assert str(err.value) == message


@pytest.mark.parametrize("c,want", [
    (0, (0, 0, 0, 0.0)), (0.25, (0, 0, 1, 0.25)), (1.5, (0, 1, 2, 0.5)), (1.999, (0, 1, 2, 0.999)),
    (2, (1, 2, 2, 0.0)), (2.5, (1, 2, 3, 0.5)), (3, (1, 3, 3, 0.0)), (4, (1, 4, 4, 0.0)), (np.float32(3.5), (1, 3, 4, 0.5)),
])
def test_locate(c, want):
    piece, lo, hi, eta = locate(c, EPOCHS)
    assert (piece, lo, hi) == want[:3] and eta == pytest.approx(want[3], abs=1e-12)
    assert type(piece) is int and type(lo) is int and type(hi) is int and type(eta) is float


@pytest.mark.parametrize("c", [-1e-9, -1, 4.000001, 5, math.nan, math.inf, -math.inf, "x", None, [1]])
def test_locate_refuses_outside_0_K(c):
    if c == 5:
        with pytest.raises(OutOfRangeError) as err:
            locate(c, EPOCHS)
        assert str(err.value) == "position c=5.0 is outside [0, 4]"
    with pytest.raises(OutOfRangeError, match=r"position c=.* (is outside \[0, 4\]|must be a (real|finite) number)"):
        locate(c, EPOCHS)


@pytest.mark.parametrize("c,piece,w", [
    (0.0, 0, [0.0, 0.0]),
    (1.0, 0, [1 / 3, 1 / 2]),
    (0.5, 0, [0.5 * 0 + 0.5 * (1 / 3), 0.5 * 0 + 0.5 * 0.5]),
    (1.25, 0, [0.75 * (1 / 3) + 0.25, 0.75 * 0.5 + 0.25]),  # hi = 2 is the piece's end: beta_hi = 1
    (2.0, 1, [0.0, 0.0]),  # an inner anchor starts the next piece
    (2.5, 1, [0.5 * (3 / 7), 0.0]),
    (3.5, 1, [0.5 * (3 / 7) + 0.5, 0.5]),
    (4.0, 1, [1.0, 1.0]),
])
@pytest.mark.parametrize("rows", [False, True], ids=["ndarray", "rows"])
def test_piece_weights_by_hand(c, piece, w, rows):
    got_piece, got = piece_weights(BETA.tolist() if rows else BETA, EPOCHS, c)
    assert got_piece == piece and len(got) == 2
    assert isinstance(got, list) if rows else got.dtype == np.float64
    np.testing.assert_allclose(got, w, rtol=1e-15, atol=0)


@pytest.mark.parametrize("c,w", [(0.0, [0.0, 0.0]), (1.0, [1 / 3, 1 / 2]), (3.5, [0.5 * (3 / 7) + 0.5, 0.5]),
                                 (4.0, [1.0, 1.0])])
def test_piece_weights_from_the_nearer_anchor_by_hand(c, w):
    """nearer=True: per layer w below 0.5, else -(1 - w), the factor of docs/format.md §7's lerp from y; w = 1
    gives -0.0 (y + (-0)*d keeps y's sign where d is 0) and w = 0 gives +0.0."""
    got_piece, got = piece_weights(BETA.tolist(), EPOCHS, c, nearer=True)
    want = [x if x < 0.5 else -(1.0 - x) for x in w]
    assert got_piece == (0 if c < 2 else 1) and got == pytest.approx(want, rel=1e-15, abs=0)
    assert [math.copysign(1.0, g) for g in got] == [math.copysign(1.0, v) for v in want]


def test_piece_weights_use_the_stored_row_not_a_neighbour():
    beta = np.array([[0.0], [0.1], [0.7], [0.9], [1.0]])  # one piece (0, 4)
    for c, w in [(1.0, 0.1), (2.0, 0.7), (2.25, 0.75 * 0.7 + 0.25 * 0.9), (3.5, 0.5 * 0.9 + 0.5 * 1.0)]:
        assert piece_weights(beta, (0, 4), c)[1][0] == pytest.approx(w, rel=1e-15)
        assert piece_weights(beta.tolist(), (0, 4), c)[1][0] == pytest.approx(w, rel=1e-15)
