"""The ConvNet family: upstream parameter order and module names, variants, and the functional form."""

import copy

import pytest
import torch

from trajstore.distill.networks import ConvNet, ConvNetConfig, FunctionalNet, ModelError, build, config_for, flat_parameters
from trajstore import TrajstoreError, layer_table

# docs/legacy-formats.md §3: ConvNet (depth 3, width 128, instancenorm, avgpool) on 3x32x32, 10 classes
REFERENCE_TABLE = [
    ("features.0.weight", (128, 3, 3, 3)), ("features.0.bias", (128,)),
    ("features.1.weight", (128,)), ("features.1.bias", (128,)),
    ("features.4.weight", (128, 128, 3, 3)), ("features.4.bias", (128,)),
    ("features.5.weight", (128,)), ("features.5.bias", (128,)),
    ("features.8.weight", (128, 128, 3, 3)), ("features.8.bias", (128,)),
    ("features.9.weight", (128,)), ("features.9.bias", (128,)),
    ("classifier.weight", (10, 2048)), ("classifier.bias", (10,)),
]


def table(net):
    return [(name, tuple(p.shape)) for name, p in net.named_parameters()]


def test_default_convnet_matches_the_reference_table_in_order():
    net = build("ConvNet", channel=3, num_classes=10, im_size=(32, 32))
    assert table(net) == REFERENCE_TABLE
    assert sum(p.numel() for p in net.parameters()) == 320_010
    assert sum(p.numel() * p.element_size() for p in net.parameters()) == 1_280_040
    # parameters() order (what legacy buffers store) is the named order
    assert [p.data_ptr() for p in net.parameters()] == [p.data_ptr() for _, p in net.named_parameters()]
    assert [layer.name for layer in layer_table(net)] == [n for n, _ in REFERENCE_TABLE]


@pytest.mark.parametrize("model, kwargs, expected", [
    # depth 4 on Tiny ImageNet: a fourth block at features.12/13, 128 x 4 x 4 features
    ("ConvNetD4", dict(num_classes=200, im_size=(64, 64)),
     {"features.12.weight": (128, 128, 3, 3), "features.13.weight": (128,), "classifier.weight": (200, 2048)}),
    ("ConvNetW32", {}, {"features.0.weight": (32, 3, 3, 3), "features.9.bias": (32,), "classifier.weight": (10, 512)}),
    # no norm: conv, relu, pool per block
    ("ConvNetNN", {}, {"features.0.weight": (128, 3, 3, 3), "features.3.weight": (128, 128, 3, 3),
                       "features.6.bias": (128,), "classifier.weight": (10, 2048)}),
    ("ConvNetBN", {}, dict(REFERENCE_TABLE)),
    ("ConvNetGN", {}, dict(REFERENCE_TABLE)),
    # layernorm over (C, H, W) before pooling
    ("ConvNetLN", {}, {"features.1.weight": (128, 32, 32), "features.5.weight": (128, 16, 16),
                       "features.9.bias": (128, 8, 8)}),
    # no pooling: conv, norm, relu per block; the classifier sees the full 32x32 map
    ("ConvNetNP", {}, {"features.3.weight": (128, 128, 3, 3), "features.7.bias": (128,),
                       "classifier.weight": (10, 128 * 32 * 32)}),
    ("ConvNetMP", {}, dict(REFERENCE_TABLE)),
    # MNIST-like 1x28x28: first conv padded by 3 to reach 32x32, as upstream
    ("ConvNet", dict(channel=1, im_size=(28, 28)), {"features.0.weight": (128, 1, 3, 3),
                                                    "classifier.weight": (10, 2048)}),
])
def test_variants_have_upstream_names_and_shapes(model, kwargs, expected):
    net = build(model, **kwargs)
    got = dict(table(net))
    for name, shape in expected.items():
        assert got[name] == shape, name
    cfg = net.config
    x = torch.randn(2, cfg.channel, *cfg.im_size)
    assert net(x).shape == (2, cfg.num_classes)


def test_variant_modules():
    assert isinstance(build("ConvNetBN").features[1], torch.nn.BatchNorm2d)
    assert build("ConvNetGN").features[1].num_groups == 4
    assert build("ConvNet").features[1].num_groups == 128  # "instancenorm" is GroupNorm(C, C)
    assert isinstance(build("ConvNetMP").features[3], torch.nn.MaxPool2d)
    assert isinstance(build("ConvNetAS").features[2], torch.nn.Sigmoid)
    assert isinstance(build("ConvNetAL").features[2], torch.nn.LeakyReLU)


def test_config_round_trip_and_unknown_models():
    cfg = config_for("ConvNetD5", 3, 100, (32, 32))
    assert cfg.depth == 5 and cfg.num_classes == 100
    assert ConvNetConfig.from_json({"name": "ConvNetD5", **cfg.to_json()}) == cfg
    for bad in ("ResNet19", "ConvNetXX", "convnet"):  # ResNet18 is a network since the family registry
        with pytest.raises(ModelError, match="ConvNet") as info:
            build(bad)
        assert isinstance(info.value, TrajstoreError)


@pytest.mark.parametrize("variant", [{}, {"norm": "none"}, {"norm": "layernorm"}, {"norm": "batchnorm"},
                                     {"activation": "sigmoid"},
                                     {"pooling": "maxpooling", "depth": 2}])
def test_functional_network_equals_module_network(variant):
    torch.manual_seed(0)
    net = ConvNet(ConvNetConfig(width=16, im_size=(16, 16), **variant)).double()
    fnet = FunctionalNet(net)
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    flat = flat_parameters(net)
    assert flat.numel() == fnet.num_params == sum(p.numel() for p in net.parameters())
    torch.testing.assert_close(fnet(flat, x), net(x), rtol=0, atol=1e-12)
    # another point in parameter space: the functional net runs it, the module's own state stays put
    moved = flat + 0.01 * torch.randn_like(flat)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = fnet(moved, x)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    reference = copy.deepcopy(net)  # the same network with the moved weights loaded the ordinary way
    torch.nn.utils.vector_to_parameters(moved, reference.parameters())
    assert not torch.equal(flat_parameters(reference), flat_parameters(net))
    torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-12)


def test_functional_network_is_differentiable_in_the_flat_vector():
    torch.manual_seed(1)
    net = build("ConvNetW8", im_size=(16, 16))
    fnet = FunctionalNet(net)
    flat = flat_parameters(net).requires_grad_(True)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.cross_entropy(fnet(flat, x), y)
    (grad,) = torch.autograd.grad(loss, flat)
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    torch.testing.assert_close(grad, torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    with pytest.raises(ValueError, match="values"):
        fnet(flat[:-1], x)
