"""DSA: upstream's operations and parameters, replayable by seed, differentiable in the images."""

import pytest
import torch

from trajstore.distill.augment import OPERATIONS, STRATEGY, DSAParams, dsa, seeded_dsa

@pytest.fixture
def batch():
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_reference_parameters():
    p = DSAParams()
    geometry = (p.prob_flip, p.ratio_scale, p.ratio_rotate, p.ratio_crop_pad, p.ratio_cutout)
    assert geometry == (0.5, 1.2, 15.0, 0.125, 0.5)
    assert (p.brightness, p.saturation, p.contrast) == (1.0, 2.0, 0.5)
    assert STRATEGY == "color_crop_cutout_flip_scale_rotate" and set(STRATEGY.split("_")) == set(OPERATIONS)


@pytest.mark.parametrize("op", [*OPERATIONS, STRATEGY])
def test_shapes_dtypes_and_determinism(batch, op, device):
    x = batch.to(device)
    for dtype in (torch.float32, torch.float64):
        y = dsa(x.to(dtype), 7, strategy=op)
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device and torch.isfinite(y).all()
    assert torch.equal(dsa(x, 7, strategy=op), dsa(x, 7, strategy=op))
    outputs = [dsa(x, s, strategy=op) for s in range(8)]
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])  # seeds do matter
    assert not torch.equal(dsa(x, 7, strategy=op), x)


def test_unseeded_calls_follow_torchs_global_generator(batch):
    torch.manual_seed(3)
    a = [dsa(batch, None) for _ in range(4)]
    torch.manual_seed(3)
    b = [dsa(batch, None) for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(a[0], x) for x in a[1:])


def test_one_operation_per_call(batch):
    """The strategy's output is always exactly one of its single operations under the same seed."""
    chosen = set()
    for seed in range(40):
        y = dsa(batch, seed)
        matches = [op for op in OPERATIONS if torch.equal(y, dsa(batch, seed, strategy=op))]
        assert len(matches) >= 1
        chosen.update(matches)
    assert chosen == set(OPERATIONS)


@pytest.mark.parametrize("op", [*OPERATIONS, STRATEGY])
def test_gradients_reach_the_images(batch, op):
    x = batch.double().requires_grad_(True)
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for seed in range(3):
        (grad,) = torch.autograd.grad((dsa(x, seed, strategy=op) * weights).sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradients_match_finite_differences(batch):
    x = batch[:2, :, :6, :6].double().requires_grad_(True)
    for op in ("scale", "rotate", "color", "crop"):
        torch.autograd.gradcheck(lambda t: dsa(t, 11, strategy=op), (x,), eps=1e-6, atol=1e-5)


def test_operations_do_what_they_say():
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(2)) + 0.5
    flipped = dsa(x, 0, strategy="flip")
    for a, b in zip(flipped, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))
    cut = dsa(x, 0, strategy="cutout")
    holes = (cut == 0).all(dim=1)  # cut out across all channels, elsewhere untouched
    assert torch.equal(cut, x * ~holes.unsqueeze(1))
    assert all(0 < h.sum() <= 64 for h in holes)  # at most an 8x8 (ratio 0.5) square
    moved = dsa(x, 5, strategy="crop")  # shifted by at most 2 pixels, zero-filled
    assert ((moved == 0) | torch.isin(moved, x)).all()
    # parameters are honoured: no scaling and no rotation leave the images as they are
    p = DSAParams(ratio_scale=1.0, ratio_rotate=0.0)
    for op in ("scale", "rotate"):
        torch.testing.assert_close(dsa(x, 1, strategy=op, params=p), x, atol=1e-5, rtol=0)


def test_batchwise_shares_one_transform_across_batch_sizes(batch):
    for seed in range(6):
        whole = dsa(batch, seed, batchwise=True)
        torch.testing.assert_close(dsa(batch[:2], seed, batchwise=True), whole[:2])
    # per-image parameters differ within a batch otherwise: the same image twice is augmented differently
    twins = batch[:1].expand(6, -1, -1, -1)
    assert any(not torch.equal(dsa(twins, s, strategy="rotate")[0], dsa(twins, s, strategy="rotate")[1])
               for s in range(3))


def test_seeded_dsa_replays_from_its_generator(batch):
    a = seeded_dsa(torch.Generator().manual_seed(9))
    b = seeded_dsa(torch.Generator().manual_seed(9))
    assert all(torch.equal(a(batch), b(batch)) for _ in range(5))


def test_bad_arguments(batch):
    with pytest.raises(ValueError, match="unknown DSA operations"):
        dsa(batch, 0, strategy="color_blur")
    with pytest.raises(ValueError, match="N, C, H, W"):
        dsa(batch[0], 0)
    assert dsa(batch, 0, strategy="none") is batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_seed_means_the_same_transform_on_cuda(batch):
    for seed in range(6):
        torch.testing.assert_close(dsa(batch.cuda(), seed).cpu(), dsa(batch, seed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", [*OPERATIONS, STRATEGY])
def test_rows_of_a_batch_get_those_rows_transform(batch, op, device):
    """How data-parallel processes augment their share of one minibatch (distill.distributed)."""
    x = batch.to(device)
    for seed in range(4):
        whole = dsa(x, seed, strategy=op)
        for first, stop in ((0, 2), (2, 6), (5, 6), (0, 6)):
            torch.testing.assert_close(dsa(x[first:stop], seed, strategy=op, rows=(first, 6)), whole[first:stop],
                                       rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not hold"):
        dsa(x[:3], 0, strategy=op, rows=(4, 6))
