"""ZCA whitening: kornia's transform, invertible, and portable as plain tensors."""

import pytest
import torch
from kornia.enhance import ZCAWhitening
from safetensors.torch import load as st_load, save as st_save

from trajstore.distill.data import DatasetError, load_dataset
from trajstore.distill.zca import ZCA
from trajstore import FormatError

SIZE = (8, 8)  # 192 features: a fit takes milliseconds


@pytest.fixture(scope="module")
def raw_digits():
    """Digits as [0, 1] pixels (normalisation undone), to whiten directly."""
    ds = load_dataset("digits", im_size=SIZE)
    return ds.to_viewable(ds.train_images), ds.to_viewable(ds.test_images)


def test_round_trip_restores_the_images(raw_digits):
    train, test = raw_digits
    zca = ZCA().fit(train)
    for x in (train, test):
        white = zca(x)
        assert white.shape == x.shape and not torch.allclose(white, x, atol=1e-2)
        torch.testing.assert_close(zca.inverse(white), x, atol=1e-4, rtol=0)


def test_it_is_kornias_transform_with_eps_0_1(raw_digits):
    train, test = raw_digits
    expected = ZCAWhitening(eps=0.1, compute_inv=True).fit(train)(test)
    torch.testing.assert_close(ZCA().fit(train)(test), expected, rtol=0, atol=0)
    # whitening decorrelates: the whitened training pixels' covariance is far closer to diagonal
    flat, white = train.flatten(1), ZCA().fit(train)(train).flatten(1)

    def off_diagonal(a):
        c = torch.corrcoef(a.T[a.std(0) > 1e-6])
        return (c - torch.diag(torch.diag(c))).abs().mean()

    assert off_diagonal(white) < 0.5 * off_diagonal(flat)


def test_state_survives_safetensors(raw_digits):
    train, test = raw_digits
    zca = ZCA().fit(train)
    state = st_load(st_save(zca.state_dict()))
    assert set(state) == {"mean_vector", "transform_matrix", "transform_inv"}
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    again = ZCA.from_state(state)
    torch.testing.assert_close(again(test), zca(test), rtol=0, atol=0)
    torch.testing.assert_close(again.inverse(zca(test)), test, atol=1e-4, rtol=0)


def test_bad_states_are_refused(raw_digits):
    state = ZCA().fit(raw_digits[0]).state_dict()
    with pytest.raises(FormatError, match="lacks"):
        ZCA.from_state({"mean_vector": state["mean_vector"]}, where="x.safetensors")
    with pytest.raises(FormatError, match="inconsistent shapes"):
        ZCA.from_state({**state, "transform_inv": state["transform_inv"][:-1]})
    with pytest.raises(ValueError, match="not been fitted"):
        ZCA().state_dict()


def test_dataset_in_zca_space_views_as_the_plain_one(raw_digits):
    white = load_dataset("digits", im_size=SIZE, zca=True)
    plain = load_dataset("digits", im_size=SIZE)
    assert white.zca is not None and white.meta()["zca"] and white.mean == (0.0,) * 3
    torch.testing.assert_close(white.to_viewable(white.train_images), raw_digits[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(white.to_viewable(white.test_images), plain.to_viewable(plain.test_images),
                               atol=1e-4, rtol=0)
    # a fitted ZCA is applied as given: the same space without refitting
    reused = load_dataset("digits", im_size=SIZE, zca=white.zca)
    assert reused.zca is white.zca
    torch.testing.assert_close(reused.test_images, white.test_images, rtol=0, atol=0)
    with pytest.raises(DatasetError, match="fitted on 192 features per image"):
        load_dataset("digits", im_size=(16, 16), zca=white.zca)
