"""trajstore's interpolation arithmetic (docs/format.md §7 step 4) against exact rational arithmetic:
the weight rounded once to the layer dtype, then y - x, the product and the sum each rounded, ties to
even. The reference is `fractions.Fraction` (test_conformance.exact_round / exact_lerp), nothing of
trajstore; the weights include ties, values below each dtype's smallest normal and both sides of 0.5.
Also the flat CPU form against tests/spec_reader.py and Expert.at's refusals. Small and fast: the
interpolation's mutation job runs it per mutant (docs/mutation-testing.md)."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from test_conformance import exact_lerp, exact_round
from trajstore.format import reader

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
BITS = {"F64": 53, "F32": 24, "F16": 11, "BF16": 8}
EMIN = {"F64": -1021, "F32": -125, "F16": -13, "BF16": -125}  # frexp exponent of the smallest normal


def weights(name: str) -> list[float]:
    """Weights that tell roundings apart: random ones, exact ties of this dtype (to even, up and down),
    ones just off a tie, values below the smallest normal (subnormal spacing), and the ends."""
    bits, emin = BITS[name], EMIN[name]
    g = np.random.default_rng(3)
    ws = [0.0, 1.0, 0.5, 0.25, 0.75, 0.1, 1 / 3, 2 / 3, math.nextafter(0.5, 0), math.nextafter(0.5, 1)]
    ws += g.random(40).tolist()
    for k in (1, 2, 3, 6, 7):  # ties in [1/2, 1) (quantum 2^-bits) and [1/4, 1/2), odd and even neighbours
        ws += [(2 ** (bits - 1) + k + 0.5) * 2.0 ** -bits, (2 ** (bits - 1) + k + 0.5) * 2.0 ** -(bits + 1)]
    if name != "F64":
        ws += [1 - 2.0 ** -(bits + 1), 1 - 2.0 ** -(bits + 2)]  # 1 - w rounds to a half quantum: a tie
        ws += [(2 ** (bits - 1) + 3.5) * 2.0 ** -bits + 2.0 ** -60]  # just above a tie
        ws += [2.0 ** (emin - 1) * f for f in (0.3, 0.5, 0.75, 1.5, 1.9)]  # below and at the smallest normal
        ws += [2.0 ** (emin - bits) * f for f in (0.4, 0.5, 0.6, 1.5, 2.5)]  # around the smallest subnormal
    return [w for w in ws if 0.0 <= w <= 1.0]


@pytest.mark.parametrize("name", list(DTYPES))
def test_weights_round_once_to_nearest_even(name):
    for w in weights(name):
        want = exact_round(Fraction(w), name)
        got = reader._round_weight(w, DTYPES[name])
        assert type(got) is float and Fraction(got) == want, (w, got, float(want))
        # and the value is one the dtype holds (a torch round trip keeps it)
        assert torch.tensor(got, dtype=torch.float64).to(DTYPES[name]).double().item() == got


def values(name: str, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x and a nearby y of the dtype, over many binades, with equal pairs and sign changes mixed in."""
    g = torch.Generator().manual_seed(11)
    scale = 2.0 ** torch.randint(-10, 6, (n,), generator=g).double()
    x = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(DTYPES[name])
    y = (x.double() + 0.05 * scale * torch.randn(n, generator=g, dtype=torch.float64)).to(DTYPES[name])
    y[:10] = x[:10]  # no motion
    y[10:20] = -x[10:20]  # through zero
    return x, y


def exact(x: torch.Tensor, y: torch.Tensor, w: float, name: str) -> list[Fraction]:
    return [exact_lerp(a, b, w, name) for a, b in zip(x.double().tolist(), y.double().tolist())]


def fractions(t: torch.Tensor) -> list[Fraction]:
    return [Fraction(v) for v in t.double().tolist()]


@pytest.mark.parametrize("name", list(DTYPES))
def test_lerp_rounds_like_exact_arithmetic(name):
    x, y = values(name)
    for w in weights(name)[::4] + [0.5, math.nextafter(0.5, 0), 0.0, 1.0]:
        want = exact(x, y, w, name)
        got = reader.lerp(x, y, w)
        assert got.dtype == DTYPES[name] and fractions(got) == want, f"w={w}"
        out = torch.full_like(x, 7.0)
        assert reader.lerp(x, y, w, out=out) is out and fractions(out) == want, f"out=, w={w}"
    assert torch.equal(reader.lerp(x, y, 0.0), x) and torch.equal(reader.lerp(x, y, 1.0), y)  # exact at the ends
    assert torch.equal(x, values(name)[0]) and torch.equal(y, values(name)[1])  # inputs left alone


@pytest.mark.parametrize("name", list(DTYPES))
def test_lerp_layers_gives_each_layer_its_own_weight(name):
    """The foreach form over layers of different lengths, weights on both sides of 0.5 interleaved."""
    x, y = values(name)
    cuts = [0, 7, 30, 31, 50, 64]
    xs = [x[a:b] for a, b in zip(cuts, cuts[1:])]
    ys = [y[a:b] for a, b in zip(cuts, cuts[1:])]
    for ws in ([0.3, 0.7, 0.5, 0.1234567, 0.9999], [0.75, 0.25, 0.0, 1.0, 0.4999999], [0.2] * 5, [0.8] * 5):
        got = reader.lerp_layers(xs, ys, ws)
        assert len(got) == len(xs)
        for i, (a, b, w) in enumerate(zip(xs, ys, ws)):
            assert got[i].dtype == DTYPES[name] and fractions(got[i]) == exact(a, b, w, name), (ws, i)
    assert torch.equal(x, values(name)[0]) and torch.equal(y, values(name)[1])  # inputs left alone


@pytest.mark.parametrize("name", ["F64", "F32", "F16"])
def test_the_flat_cpu_form_rounds_each_layer_like_the_spec(name):
    """reader._FlatLerp, what Expert.at(flat=True) runs on the CPU: big layers (a multiply of their own),
    runs of small ones (one multiply, a factor per value), an empty layer; per layer a weight below, at
    and above 0.5 (at 0.5 the spec's y - 0.5 (y - x) and x + 0.5 (y - x) differ where y - x rounds).
    The reference is tests/spec_reader.py's numpy §7, itself checked against Fractions."""
    import spec_reader

    big = reader._FlatLerp.BIG
    numels = [3, 0, big, 7, 1, big + 5, 2, 40]
    bounds = np.cumsum([0, *numels])
    x, y = values(name, int(bounds[-1]))
    x, y = x.numpy(), y.numpy()
    flat = reader._FlatLerp(numels)
    d_parts = flat.split(np.subtract(y, x))
    for ws in ([0.5, 0.3, 0.5, 0.7, 0.5, 0.5, 0.25, 0.999], [0.0, 1.0, 0.1234567, 0.5, 0.75, 0.4999999, 1.0, 0.5],
               [0.5] * 8, [0.2] * 8, [0.8] * 8, [0.0] * 8, [1.0] * 8, [0.0, 1.0] * 4):
        out = np.full_like(x, 7.0)
        # it takes each weight from the nearer anchor: w below 0.5, else -(1 - w) (piece_weights' nearer=True)
        flat(x, y, d_parts, [w if w < 0.5 else -(1.0 - w) for w in ws], out, flat.split(out))
        for layer, w in enumerate(ws):
            a, b = bounds[layer], bounds[layer + 1]
            want = spec_reader.lerp(x[a:b], y[a:b], w, name)
            bits = {8: np.uint64, 4: np.uint32, 2: np.uint16}[x.itemsize]  # signed zeros too
            assert out.dtype == x.dtype and np.array_equal(out[a:b].view(bits), want.astype(x.dtype).view(bits)), \
                (ws, layer)


def test_at_refuses_bad_arguments_naming_the_store():
    """Expert.at's refusals, word for word: each names the store and what was wrong."""
    import trajstore

    golden = Path(__file__).parent / "data" / "golden" / "f32.ctraj"
    e = trajstore.open(golden).expert(0)
    where = f"{golden}: "
    for kwargs, exc, message in [
            (dict(c=8.5), trajstore.OutOfRangeError, "position c=8.5 is outside [0, 8]"),
            (dict(c=-1), trajstore.OutOfRangeError, "position c=-1.0 is outside [0, 8]"),
            (dict(c=0.5, device="nonsense"), trajstore.TrajstoreError, "device='nonsense' is not a torch device ("),
            (dict(c=0.5, dtype=torch.int32), trajstore.TrajstoreError,
             "dtype=torch.int32 is not supported; use one of torch.float64, torch.float32, torch.float16, "
             "torch.bfloat16 (or None for the stored dtype)"),
            (dict(c=0.5, out=torch.zeros(3)), trajstore.TrajstoreError,
             "out= takes a torch.Tensor, and only with flat=True (got Tensor)"),
            (dict(c=0.5, flat=True, out=[0.0] * 362), trajstore.TrajstoreError,
             "out= takes a torch.Tensor, and only with flat=True (got list)"),
            (dict(c=0.5, flat=True, out=torch.zeros(3)), trajstore.TrajstoreError,
             "out must be a torch.float32 vector of 362 values on cpu"),
            (dict(c=0.5, flat=True, out=torch.zeros(362, dtype=torch.float64)), trajstore.TrajstoreError,
             "out must be a torch.float32 vector of 362 values on cpu"),
            (dict(c=0.5, flat=True, out=torch.zeros(362, requires_grad=True)), trajstore.TrajstoreError,
             "out must not require grad (pass a tensor made under torch.no_grad())")]:
        c = kwargs.pop("c")
        with pytest.raises(exc) as err:
            e.at(c, **kwargs)
        assert str(err.value).startswith(where + message), str(err.value)
        assert err.value.path == str(golden)


def test_a_flat_vector_of_mixed_dtype_layers_needs_a_dtype(tmp_path):
    import trajstore

    path = tmp_path / "mixed.ctraj"
    with trajstore.create(path, [("a", (3,), "F32"), ("b", (2,), "F16")], 3) as w:  # both move linearly
        w.write_expert([[torch.tensor([0.0, 1.0, 2.0]) * (t + 1), torch.tensor([1.0, 2.0], dtype=torch.float16) * (t + 1)]
                        for t in range(3)])
    e = trajstore.open(path).expert(0)
    with pytest.raises(trajstore.TrajstoreError) as err:
        e.at(0.5, flat=True)
    assert str(err.value) == f"{path}: layers have different dtypes; pass dtype= for a flat vector"
    # equal steps: beta(1) = 1/2, so c = 0.5 is a quarter of the way from theta(0) to theta(2) = 3 theta(0)
    got = e.at(0.5, flat=True, dtype=torch.float32)
    assert got.dtype == torch.float32 and got.tolist() == [0.0, 1.5, 3.0, 1.5, 3.0]
