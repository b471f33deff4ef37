"""The network registry: every upstream MTT network against its parameter table written out by hand from
upstream's networks.py (names, shapes, count), built, trained a step on digits, and recognised from a
legacy buffer's shapes."""

import math
import warnings

import pytest
import torch

import trajstore
from trajstore import architectures
from trajstore.distill.data import load_dataset
from trajstore.distill.networks import NETWORKS, FunctionalNet, ModelError, build, flat_parameters


def parse(text):
    """'name d0,d1,...' per line -> [(name, shape)]."""
    return [(name, tuple(int(d) for d in dims.split(","))) for name, dims in (line.split() for line in
                                                                             text.strip().splitlines())]


# Upstream networks.py on 3x32x32 images, 10 classes, read off each class's __init__ by hand.
MLP = parse("""
fc_1.weight 128,3072
fc_1.bias 128
fc_2.weight 128,128
fc_2.bias 128
fc_3.weight 10,128
fc_3.bias 10
""")
# features = Conv(3,6,5) ReLU MaxPool Conv(6,16,5) ReLU MaxPool; 32 -> 28 -> 14 -> 10 -> 5
LENET = parse("""
features.0.weight 6,3,5,5
features.0.bias 6
features.3.weight 16,6,5,5
features.3.bias 16
fc_1.weight 120,400
fc_1.bias 120
fc_2.weight 84,120
fc_2.bias 84
fc_3.weight 10,84
fc_3.bias 10
""")
# Conv ReLU Pool Conv ReLU Pool Conv ReLU Conv ReLU Conv ReLU Pool; 32 -> 16 -> 8 -> 4
ALEXNET = parse("""
features.0.weight 128,3,5,5
features.0.bias 128
features.3.weight 192,128,5,5
features.3.bias 192
features.6.weight 256,192,3,3
features.6.bias 256
features.8.weight 192,256,3,3
features.8.bias 192
features.10.weight 192,192,3,3
features.10.bias 192
fc.weight 10,3072
fc.bias 10
""")
# cfg 64 M 128 M 256 256 M 512 512 M 512 512 M: (Conv, Norm, ReLU) per number, MaxPool per M
VGG11 = parse("""
features.0.weight 64,3,3,3
features.0.bias 64
features.1.weight 64
features.1.bias 64
features.4.weight 128,64,3,3
features.4.bias 128
features.5.weight 128
features.5.bias 128
features.8.weight 256,128,3,3
features.8.bias 256
features.9.weight 256
features.9.bias 256
features.11.weight 256,256,3,3
features.11.bias 256
features.12.weight 256
features.12.bias 256
features.15.weight 512,256,3,3
features.15.bias 512
features.16.weight 512
features.16.bias 512
features.18.weight 512,512,3,3
features.18.bias 512
features.19.weight 512
features.19.bias 512
features.22.weight 512,512,3,3
features.22.bias 512
features.23.weight 512
features.23.bias 512
features.25.weight 512,512,3,3
features.25.bias 512
features.26.weight 512
features.26.bias 512
classifier.weight 10,512
classifier.bias 10
""")
# conv1 bn1, then layer1..4 of two BasicBlocks (conv1 bn1 conv2 bn2 [shortcut conv, norm]); no conv bias
RESNET18 = parse("""
conv1.weight 64,3,3,3
bn1.weight 64
bn1.bias 64
layer1.0.conv1.weight 64,64,3,3
layer1.0.bn1.weight 64
layer1.0.bn1.bias 64
layer1.0.conv2.weight 64,64,3,3
layer1.0.bn2.weight 64
layer1.0.bn2.bias 64
layer1.1.conv1.weight 64,64,3,3
layer1.1.bn1.weight 64
layer1.1.bn1.bias 64
layer1.1.conv2.weight 64,64,3,3
layer1.1.bn2.weight 64
layer1.1.bn2.bias 64
layer2.0.conv1.weight 128,64,3,3
layer2.0.bn1.weight 128
layer2.0.bn1.bias 128
layer2.0.conv2.weight 128,128,3,3
layer2.0.bn2.weight 128
layer2.0.bn2.bias 128
layer2.0.shortcut.0.weight 128,64,1,1
layer2.0.shortcut.1.weight 128
layer2.0.shortcut.1.bias 128
layer2.1.conv1.weight 128,128,3,3
layer2.1.bn1.weight 128
layer2.1.bn1.bias 128
layer2.1.conv2.weight 128,128,3,3
layer2.1.bn2.weight 128
layer2.1.bn2.bias 128
layer3.0.conv1.weight 256,128,3,3
layer3.0.bn1.weight 256
layer3.0.bn1.bias 256
layer3.0.conv2.weight 256,256,3,3
layer3.0.bn2.weight 256
layer3.0.bn2.bias 256
layer3.0.shortcut.0.weight 256,128,1,1
layer3.0.shortcut.1.weight 256
layer3.0.shortcut.1.bias 256
layer3.1.conv1.weight 256,256,3,3
layer3.1.bn1.weight 256
layer3.1.bn1.bias 256
layer3.1.conv2.weight 256,256,3,3
layer3.1.bn2.weight 256
layer3.1.bn2.bias 256
layer4.0.conv1.weight 512,256,3,3
layer4.0.bn1.weight 512
layer4.0.bn1.bias 512
layer4.0.conv2.weight 512,512,3,3
layer4.0.bn2.weight 512
layer4.0.bn2.bias 512
layer4.0.shortcut.0.weight 512,256,1,1
layer4.0.shortcut.1.weight 512
layer4.0.shortcut.1.bias 512
layer4.1.conv1.weight 512,512,3,3
layer4.1.bn1.weight 512
layer4.1.bn1.bias 512
layer4.1.conv2.weight 512,512,3,3
layer4.1.bn2.weight 512
layer4.1.bn2.bias 512
classifier.weight 10,512
classifier.bias 10
""")
# _AP: the shortcut is Conv, AvgPool2d, Norm (the norm is shortcut.2); no final pooling: 512 x 4 x 4
RESNET18_AP = [(n.replace("shortcut.1.", "shortcut.2."), s) for n, s in RESNET18[:-2]] + parse("""
classifier.weight 10,8192
classifier.bias 10
""")

# Parameter counts added up by hand (ResNet18: the well-known 11,173,962 of the CIFAR ResNet18).
REFERENCE = {
    "MLP": (MLP, 411_146), "LeNet": (LENET, 62_006), "AlexNet": (ALEXNET, 1_872_202),
    "VGG11": (VGG11, 9_231_114), "VGG11BN": (VGG11, 9_231_114),
    "ResNet18": (RESNET18, 11_173_962), "ResNet18BN": (RESNET18, 11_173_962),
    "ResNet18_AP": (RESNET18_AP, 11_250_762), "ResNet18BN_AP": (RESNET18_AP, 11_250_762),
}
# 1x28x28 (MNIST), where upstream pads or hard-codes: each network's input to its last linear layer(s)
MNIST = {"MLP": ("fc_1.weight", (128, 784)), "LeNet": ("fc_1.weight", (120, 400)),
         "AlexNet": ("fc.weight", (10, 3072)), "VGG11": ("classifier.weight", (10, 512)),
         "ResNet18": ("classifier.weight", (10, 512)), "ResNet18_AP": ("classifier.weight", (10, 4608))}
NORMS = {"VGG11": torch.nn.GroupNorm, "VGG11BN": torch.nn.BatchNorm2d, "ResNet18": torch.nn.GroupNorm,
         "ResNet18BN": torch.nn.BatchNorm2d, "ResNet18_AP": torch.nn.GroupNorm, "ResNet18BN_AP": torch.nn.BatchNorm2d}


def table(net):
    return [(n, tuple(p.shape)) for n, p in net.named_parameters()]


@pytest.mark.parametrize("model", list(REFERENCE))
def test_each_network_has_upstreams_table(model):
    want, count = REFERENCE[model]
    assert sum(math.prod(s) for _, s in want) == count  # the hand table adds up to the hand count
    with torch.device("meta"):
        net = build(model, 3, 10, (32, 32))
    assert table(net) == want
    assert architectures.spec_for(model).layers() == want
    assert architectures.spec_for(model).num_params() == count
    assert architectures.spec_for(model).name == model
    if model in NORMS:
        norms = [m for m in net.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d))]
        assert norms and all(type(m) is NORMS[model] for m in norms)
        assert all(m.num_groups == m.num_channels for m in norms if isinstance(m, torch.nn.GroupNorm))


@pytest.mark.parametrize("model", list(MNIST))
def test_mnist_sized_inputs_match_upstreams_padding(model):
    name, shape = MNIST[model]
    with torch.device("meta"):
        net = build(model, 1, 10, (28, 28))
        assert dict(table(net))[name] == shape
        assert net(torch.empty(2, 1, 28, 28)).shape == (2, 10)
    assert architectures.spec_for(model, 1, 10, (28, 28)).layers() == table(net)


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return ds.train_images[:2], ds.train_labels[:2]  # two images: BatchNorm needs more than one value


@pytest.mark.parametrize("model", ["MLP", "LeNet", "AlexNet", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN_AP",
                                   "ConvNetBN"])
def test_each_network_trains_a_step_on_digits(model, digits):
    x, y = digits
    torch.manual_seed(0)
    net = build(model, 3, 10, (32, 32))
    before = flat_parameters(net).clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = flat_parameters(net)
    assert torch.isfinite(loss) and torch.isfinite(after).all()
    moved = [not torch.equal(p.detach(), q) for p, q in zip(net.parameters(), torch.split(before, [p.numel() for p in net.parameters()]))]
    assert all(moved)  # every parameter gets a gradient: none is left out of the forward pass


def test_every_family_has_exactly_one_network():
    assert set(NETWORKS) == set(architectures.FAMILIES)
    assert {f.family for f in architectures.FAMILIES} >= {"ConvNet", "MLP", "LeNet", "AlexNet", "VGG", "ResNet"}
    with pytest.raises(ModelError, match="unknown model 'ResNet50'.*ResNet18"):
        build("ResNet50")
    with pytest.raises(ModelError, match="larger images"):
        build("ResNet18", im_size=(8, 8))


@pytest.mark.parametrize("model", list(REFERENCE) + ["ConvNet", "ConvNetD4", "ConvNetNP"])
@pytest.mark.parametrize("dataset", [(3, 10, (32, 32)), (1, 10, (28, 28)), (3, 200, (64, 64))])
def test_legacy_buffers_of_each_family_are_named_from_their_shapes(model, dataset):
    spec = architectures.spec_for(model, *dataset)
    shapes = [s for _, s in spec.layers()]
    with warnings.catch_warnings():
        # ResNet18_AP on 32x32 has the shapes of ResNet18 on 128x128 (with other names): it warns
        warnings.simplefilter("ignore" if model.endswith("_AP") and dataset[2] == (32, 32) else "error")
        naming = architectures.name_tensors(shapes)
    assert naming.names == tuple(n for n, _ in spec.layers())
    # batch and instance norm share names and shapes: the default is reported unless the model is named
    default = model.replace("BN", "") if not model.startswith("ConvNet") else spec.name
    assert naming.architecture["name"] == default
    given = architectures.name_tensors(shapes, model)
    assert given.architecture["name"] == model and given.names == naming.names


def test_an_ambiguous_buffer_warns_and_takes_the_given_model():
    shapes = [s for _, s in RESNET18_AP]
    with pytest.warns(UserWarning, match="ResNet18_AP on 32x32, ResNet18 on 128x128"):
        naming = architectures.name_tensors(shapes)
    assert naming.names == tuple(n for n, _ in RESNET18_AP)  # CIFAR's side first
    with pytest.raises(trajstore.FormatError, match="shapes of VGG11"):
        architectures.name_tensors(shapes, "VGG11")
    spec = architectures.spec_for("ResNet18", 3, 10, (128, 128))
    assert architectures.name_tensors(shapes, "ResNet18").architecture == {**spec.to_json(), "source": "given"}
    # a recorded description names exactly, whatever the family
    assert architectures.name_tensors(shapes, spec.to_json()).names[9] == "layer1.1.conv1.weight"


def test_batchnorm_students_use_batch_statistics_like_upstreams():
    """Upstream's student is a ReparamModule in train mode: BatchNorm normalises with the batch's own
    statistics. The functional student does so in any mode, and updates no running statistics."""
    torch.manual_seed(0)
    net = build("ConvNetBN", 3, 10, (16, 16)).double()
    reference = build("ConvNetBN", 3, 10, (16, 16)).double()
    reference.load_state_dict(net.state_dict())
    student = FunctionalNet(net)
    assert not [n for n, _ in net.named_buffers()]  # nothing beside the parameters: a trajectory holds those
    flat = flat_parameters(net)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    reference.train()
    torch.testing.assert_close(student(flat, x), reference(x), rtol=0, atol=1e-12)
    net.eval()
    torch.testing.assert_close(student(flat, x), reference(x), rtol=0, atol=1e-12)
    # by hand: the first BatchNorm of the batch is (h - mean) / sqrt(var + eps) over (N, H, W), biased var
    h = torch.nn.functional.conv2d(x, net.features[0].weight, net.features[0].bias, padding=1)
    mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    bn = net.features[1]
    want = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(net.features[1](h), want)


def test_a_resnet18_expert_names_every_parameter(tmp_path):
    import dataclasses

    from trajstore.distill.experts import train_experts

    ds = load_dataset("digits")
    tiny = dataclasses.replace(ds, train_images=ds.train_images[:2], train_labels=ds.train_labels[:2],
                               test_images=ds.test_images[:2], test_labels=ds.test_labels[:2])
    out = train_experts(tmp_path / "r.ctraj", dataset=tiny, model="ResNet18", num_experts=1, epochs=1,
                        progress=False, log=lambda _: None)
    store = trajstore.open(out)
    assert [(layer.name, tuple(layer.shape)) for layer in store.layers] == RESNET18
    assert store.architecture["name"] == "ResNet18" and store.architecture["norm"] == "instancenorm"
    assert architectures.spec_from_json(store.architecture) == architectures.spec_for("ResNet18")
    end = store.expert(0).at(1.0)
    assert list(end) == [n for n, _ in RESNET18] and end["classifier.weight"].shape == (10, 512)


def test_experts_command_trains_any_family(tmp_path):
    from click.testing import CliRunner

    from trajstore.cli.main import cli

    result = CliRunner().invoke(cli, ["experts", str(tmp_path / "l.ctraj"), "--model", "LeNet", "--num-experts", "1",
                                      "--epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    store = trajstore.open(tmp_path / "l.ctraj")
    assert [(layer.name, tuple(layer.shape)) for layer in store.layers] == LENET
    assert store.architecture["name"] == "LeNet"


# -- cross-architecture evaluation ------------------------------------------------------------------

def test_cross_architecture_table(tmp_path):
    import json

    from click.testing import CliRunner

    from trajstore.cli.main import cli
    from trajstore.distill.evaluate import evaluate_synset, random_subset
    from trajstore.distill.synset import save_synset

    ds = load_dataset("digits", im_size=(8, 8), channels=1)
    images, labels = random_subset(ds, 1, seed=0)
    path = save_synset(tmp_path / "s.safetensors", images, labels, lr=0.01, meta={"model": "ConvNetW8"}, dataset=ds)
    args = ["evaluate", str(path), "--models", "ConvNetW8,MLP,VGG11", "--epochs", "1", "--num-nets", "2", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s_crossarch.json").read_text())
    assert report["models"] == ["ConvNetW8", "MLP", "VGG11"] and report["sets"] == [str(path)]
    for model in ("ConvNetW8", "MLP"):  # each network trained with the protocol, as evaluate_synset does alone
        alone = evaluate_synset(images, labels, ds, lr=0.01, num_nets=2, epochs=1, model=model, progress=False)
        cell = report["cells"][model][str(path)]["result"]
        assert cell["accuracies"] == list(alone.accuracies) and cell["std"] == pytest.approx(alone.std)
        assert f"| {model} | {100 * alone.mean:.2f} +- {100 * alone.std:.2f} |" in result.output + \
            (tmp_path / "s_crossarch.md").read_text()
    # VGG11 pools five times: 1x8x8 images are too small in upstream's definition; its row says so
    assert report["cells"]["VGG11"][str(path)]["result"] is None
    assert "| VGG11 | n/a (VGG11 needs images of at least 32x32" in (tmp_path / "s_crossarch.md").read_text()
    assert (tmp_path / "s_crossarch.png").read_bytes()[:4] == b"\x89PNG"
    again = CliRunner().invoke(cli, args)  # an earlier report is kept unless --force, before any training
    assert again.exit_code == 1 and "s_crossarch.json" in again.output and "--force" in again.output
    bad = CliRunner().invoke(cli, ["evaluate", str(path), "--models", "ConvNet,ResNet50", "--force"])
    assert bad.exit_code == 1 and "unknown model 'ResNet50'" in bad.output
    both = CliRunner().invoke(cli, ["evaluate", str(path), "--models", "MLP", "--model", "MLP"])
    assert both.exit_code == 2 and "not both" in both.output


def test_convert_names_a_legacy_buffer_of_another_family(tmp_path, legacy_write):
    from click.testing import CliRunner

    from trajstore.cli.main import cli

    source = tmp_path / "buffers" / "run7"  # a directory name that names no network: shapes decide
    legacy_write(source, 2, num_timesteps=3, layers=LENET)
    result = CliRunner().invoke(cli, ["convert", str(source), str(tmp_path / "a.ctraj"), "--quiet"])
    assert result.exit_code == 0, result.output
    store = trajstore.open(tmp_path / "a.ctraj")
    assert [(layer.name, tuple(layer.shape)) for layer in store.layers] == LENET
    assert store.architecture["name"] == "LeNet" and store.architecture["source"] == "inferred from shapes"
    result = CliRunner().invoke(cli, ["convert", str(source), str(tmp_path / "b.ctraj"), "--model", "AlexNet"])
    assert result.exit_code == 1 and "do not have the shapes of AlexNet" in result.output
    # shapes no family has: converted all the same, with generic names, and a warning that says so
    odd = tmp_path / "buffers" / "odd"
    legacy_write(odd, 1, num_timesteps=3, layers=[("w", (5, 7)), ("b", (5,))])
    with pytest.warns(UserWarning, match="match no known architecture .*ResNet18.*param_0 .. param_1"):
        result = CliRunner().invoke(cli, ["convert", str(odd), str(tmp_path / "c.ctraj"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert [layer.name for layer in trajstore.open(tmp_path / "c.ctraj").layers] == ["param_0", "param_1"]


def test_crossarch_benchmark_merges_one_table(tmp_path):
    import json

    from benchmarks import bench_crossarch
    from trajstore.distill.evaluate import random_subset
    from trajstore.distill.synset import save_synset

    ds = load_dataset("digits", im_size=(8, 8), channels=1)
    paths = {}
    for seed, name in enumerate(("A", "B")):
        images, labels = random_subset(ds, 1, seed=seed)
        paths[name] = save_synset(tmp_path / f"{name}.safetensors", images, labels, lr=0.01, meta={}, dataset=ds)
    out = tmp_path / "x.json"
    bench_crossarch.main(["--set", f"A={paths['A']}", "--set", f"B={paths['B']}", "--models", "MLP,ResNet18",
                          "--nets", "1", "--epochs", "1", "--workers", "1", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["results"]["models"] == ["MLP", "ResNet18"] and doc["results"]["sets"] == ["A", "B"]
    assert doc["results"]["cells"]["MLP"]["B"]["result"]["accuracies"][0] > 0
    assert "needs larger images" in doc["results"]["cells"]["ResNet18"]["A"]["skipped"]
    assert (tmp_path / "x.md").read_text().startswith("| network | A (%) | B (%) |")
