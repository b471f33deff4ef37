"""Legacy buffers: finding, naming, reading and refusing them (trajstore.legacy, trajstore.architectures)."""

import os
import warnings

import pytest
import torch
from helpers import random_walk

import trajstore
from trajstore.distill.networks import build
from trajstore.architectures import infer, name_tensors
from trajstore.architectures.convnet import ConvNetSpec, spec_for
from trajstore.tools.inspect import mtt_nbytes
from trajstore.legacy import open_buffer


def bits_equal(a, b):
    return all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b))


# -- architectures ---------------------------------------------------------------------------------

MODELS = ["ConvNet", "ConvNetD1", "ConvNetD2", "ConvNetD4", "ConvNetD5", "ConvNetW32", "ConvNetW256", "ConvNetBN",
          "ConvNetLN", "ConvNetIN", "ConvNetGN", "ConvNetNN", "ConvNetAP", "ConvNetMP", "ConvNetNP", "ConvNetAS"]
DATASETS = [(3, 10, (32, 32)), (1, 10, (28, 28)), (3, 200, (64, 64)), (3, 100, (32, 32)), (1, 7, (32, 32))]


@pytest.mark.parametrize("model", MODELS)
def test_shape_tables_equal_the_networks(model):
    for channel, classes, im in DATASETS:
        net = build(model, channel, classes, im)
        want = [(n, tuple(p.shape)) for n, p in net.named_parameters()]
        spec = spec_for(model, channel, classes, im)
        assert spec.layers() == want, (model, channel, classes, im)
        assert spec.name == model.replace("ConvNetIN", "ConvNet").replace("ConvNetAP", "ConvNet")


@pytest.mark.parametrize("model", ["ConvNet", "ConvNetD4", "ConvNetD1", "ConvNetW64", "ConvNetNN", "ConvNetNP",
                                   "ConvNetLN", "ConvNetBN", "ConvNetMP", "ConvNetAS"])
@pytest.mark.parametrize("dataset", [(3, 10, (32, 32)), (1, 10, (28, 28)), (3, 200, (64, 64)), (3, 10, (128, 128))])
def test_names_are_inferred_from_shapes(model, dataset):
    table = spec_for(model, *dataset).layers()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every family member is named without ambiguity
        found = infer([shape for _, shape in table])
    assert found.layers() == table


def test_unknown_shapes_fall_back_to_param_names_with_a_warning():
    with pytest.warns(UserWarning, match="param_0 .. param_2"):
        naming = name_tensors([(5, 7), (5,), (3, 3, 3)])
    assert naming.names == ("param_0", "param_1", "param_2") and naming.architecture is None


def test_a_named_architecture_must_fit():
    table = spec_for("ConvNetD4", 3, 10, (64, 64)).layers()
    shapes = [s for _, s in table]
    naming = name_tensors(shapes, "ConvNetD4")
    assert naming.names == tuple(n for n, _ in table)
    assert naming.architecture["im_size"] == [64, 64] and naming.architecture["depth"] == 4
    with pytest.raises(trajstore.FormatError, match="ConvNetD5"):
        name_tensors(shapes, "ConvNetD5")
    with pytest.raises(trajstore.FormatError, match="unknown model"):
        name_tensors(shapes, "ResNet19")
    with pytest.raises(trajstore.FormatError, match="shapes of ResNet18"):  # a network, but not this one
        name_tensors(shapes, "ResNet18")
    with pytest.raises(trajstore.FormatError, match="2 names were given"):
        name_tensors(shapes, ["a", "b"])
    assert name_tensors(shapes, [f"t{i}" for i in range(len(shapes))]).names[-1] == f"t{len(shapes) - 1}"


def test_a_ConvNet_dict_names_exactly():
    spec = ConvNetSpec(channel=1, num_classes=3, im_size=(16, 16), width=8, depth=2, pooling="none")
    shapes = [s for _, s in spec.layers()]
    assert name_tensors(shapes, spec.to_json()).names == tuple(n for n, _ in spec.layers())


# -- discovery -------------------------------------------------------------------------------------

def test_model_dir_file_and_root_read_the_same(legacy_buffer):
    directory, trajs = legacy_buffer
    for path in (directory, directory.parent.parent):
        buf = open_buffer(path)
        assert (buf.num_experts, buf.num_timesteps, len(buf.files)) == (5, 11, 3)
        assert [layer.name for layer in buf.layers][:3] == ["features.0.weight", "features.0.bias", "features.1.weight"]
        assert buf.training == {"dataset": "CIFAR10", "zca": False, "inferred_from": "directory name"}
        for i, traj in enumerate(trajs):
            got = buf.trajectory(i)
            assert all(bits_equal(a, b) for a, b in zip(got, traj))
            assert bits_equal(buf.timestep(i, 7), traj[7])
    one = open_buffer(directory / "replay_buffer_1.pt")
    assert one.num_experts == 2 and bits_equal(one.timestep(1, 3), trajs[3][3])


def test_files_are_taken_in_numeric_order_and_gaps_warn(tmp_path, legacy_layers):
    d = tmp_path / "ConvNet"
    d.mkdir()
    trajs = [random_walk(legacy_layers, 3, seed=s) for s in range(12)]
    for n in (0, 1, 2, 10, 11):  # 3..9 missing: upstream would stop after _2
        torch.save([trajs[n]], d / f"replay_buffer_{n}.pt")
    with pytest.warns(UserWarning, match="missing"):
        buf = open_buffer(d)
    assert [f.name for f in buf.files] == [f"replay_buffer_{n}.pt" for n in (0, 1, 2, 10, 11)]
    assert bits_equal(buf.timestep(3, 2), trajs[10][2]) and bits_equal(buf.timestep(4, 0), trajs[11][0])


def test_a_root_with_several_buffers_or_none_is_refused(tmp_path, legacy_write):
    legacy_write(tmp_path / "CIFAR10" / "ConvNet", 1, num_timesteps=3)
    legacy_write(tmp_path / "CIFAR100" / "ConvNet", 1, num_timesteps=3)
    with pytest.raises(trajstore.FormatError, match="holds 2 buffer directories"):
        open_buffer(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(trajstore.FormatError, match="no legacy buffer files"):
        open_buffer(tmp_path / "empty")
    with pytest.raises(trajstore.FormatError, match="no such"):
        open_buffer(tmp_path / "nowhere")


def test_raw_files_win_over_mct_files_beside_them(legacy_buffer):
    directory, trajs = legacy_buffer
    torch.save([trajs[0]], directory / "convexified_replay_buffer_0.pt")
    with pytest.warns(UserWarning, match="convexified_replay_buffer"):
        assert open_buffer(directory).kind == "replay_buffer"
    dense = open_buffer(directory, kind="convexified_replay_buffer")
    assert (dense.kind, dense.num_experts) == ("convexified_replay_buffer", 1)
    assert open_buffer(directory / "convexified_replay_buffer_0.pt").kind == "convexified_replay_buffer"
    with pytest.raises(trajstore.FormatError, match="holds no waypoint_buffer files"):
        open_buffer(directory, kind="waypoint_buffer")


def test_ZCA_and_dataset_come_from_the_directory_name(tmp_path, legacy_write):
    legacy_write(tmp_path / "Tiny" / "ConvNetD4", 1, num_timesteps=3)
    legacy_write(tmp_path / "ImageNet" / "imagenette" / "128" / "ConvNet", 1, num_timesteps=3)
    assert open_buffer(tmp_path / "Tiny" / "ConvNetD4").training["zca"] is True
    assert open_buffer(tmp_path / "ImageNet").training == {}


# -- refusals --------------------------------------------------------------------------------------

class Evil:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_without_running(tmp_path, legacy_layers):
    marker = tmp_path / "PWNED"
    d = tmp_path / "ConvNet"
    d.mkdir()
    torch.save([random_walk(legacy_layers, 3) + [Evil(marker)]], d / "replay_buffer_0.pt")
    with pytest.raises(trajstore.UnsafeFileError, match=r"replay_buffer_0.pt.*refused without running it.*system"):
        open_buffer(d)
    assert not marker.exists()


def upstream_cpu_trajectory(num_timesteps=4):
    """What upstream buffer code saves when run on a CPU: `.cpu()` returns the live parameter, which
    SGD then updates in place, so every timestep aliases the final weights."""
    torch.manual_seed(0)
    net = build("ConvNetW32", 3, 4, (32, 32))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    timesteps = [[p.detach().cpu() for p in net.parameters()]]
    for _ in range(num_timesteps - 1):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        timesteps.append([p.detach().cpu() for p in net.parameters()])
    return timesteps


def save(directory, obj, n=0):
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(obj, directory / f"replay_buffer_{n}.pt")
    return directory


def test_aliased_timesteps_are_refused(tmp_path):
    d = save(tmp_path / "ConvNet", [upstream_cpu_trajectory()])
    with pytest.raises(trajstore.DegenerateTrajectoryError, match="trajectory 0: all 4 timesteps alias one storage"):
        open_buffer(d)


def test_identical_timesteps_are_refused_when_read(tmp_path, legacy_layers):
    frozen = random_walk(legacy_layers, 1)[0]
    d = save(tmp_path / "ConvNet", [random_walk(legacy_layers, 4), [[t.clone() for t in frozen] for _ in range(4)]])
    buf = open_buffer(d)  # opening reads no tensor data
    buf.trajectory(0)
    with pytest.raises(trajstore.DegenerateTrajectoryError, match="trajectory 1: all 4 timesteps are identical"):
        buf.timestep(1, 2)
    with pytest.raises(trajstore.DegenerateTrajectoryError):
        list(buf.iter_trajectories())


def test_ragged_and_mismatched_experts_are_refused(tmp_path, legacy_layers):
    d = save(tmp_path / "a" / "ConvNet", [random_walk(legacy_layers, 5)])
    save(d, [random_walk(legacy_layers, 4)], n=1)
    with pytest.raises(trajstore.DegenerateTrajectoryError, match=r"_1.pt: ragged buffer: trajectory 0 has 4"):
        open_buffer(d)
    other = [(n, (s[0] + 1, *s[1:])) if n == "classifier.bias" else (n, s) for n, s in legacy_layers]
    d = save(tmp_path / "b" / "ConvNet", [random_walk(legacy_layers, 3), random_walk(other, 3)])
    with pytest.raises(trajstore.DegenerateTrajectoryError, match=r"trajectory 1 does not have the shapes.*tensor 13"):
        open_buffer(d)
    steps = random_walk(legacy_layers, 3)
    steps[2] = steps[2][:-1]
    d = save(tmp_path / "c" / "ConvNet", [steps])
    with pytest.raises(trajstore.DegenerateTrajectoryError, match="timestep 2 differs in shape"):
        open_buffer(d)


def test_non_float_and_non_tensor_contents_are_refused(tmp_path, legacy_layers):
    steps = random_walk(legacy_layers, 3)
    steps[1][4] = steps[1][4].long()
    with pytest.raises(trajstore.FormatError, match="timestep 1, tensor 4 has dtype torch.int64"):
        open_buffer(save(tmp_path / "a" / "ConvNet", [steps]))
    with pytest.raises(trajstore.FormatError, match="is a dict, expected a list"):
        open_buffer(save(tmp_path / "b" / "ConvNet", {"w": torch.zeros(3)}))
    with pytest.raises(trajstore.FormatError, match="holds no trajectories"):
        open_buffer(save(tmp_path / "c" / "ConvNet", []))
    with pytest.raises(trajstore.FormatError, match="entry 0 is a str"):
        open_buffer(save(tmp_path / "d" / "ConvNet", [[["x"], ["y"]]]))


def test_empty_truncated_and_foreign_files_are_refused(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    data = (directory / "replay_buffer_0.pt").read_bytes()
    cases = {"empty": (b"", "file is empty"),
             "truncated": (data[: len(data) // 2], "truncated or corrupt"),
             "text": (b"hello, world", "not a torch file")}
    for name, (content, message) in cases.items():
        d = tmp_path / name / "ConvNet"
        d.mkdir(parents=True)
        (d / "replay_buffer_0.pt").write_bytes(content)
        with pytest.raises(trajstore.FormatError, match=f"replay_buffer_0.pt: .*{message}"):
            open_buffer(d)


def test_a_changed_file_is_noticed_when_reloaded(legacy_buffer, legacy_layers):
    directory, _ = legacy_buffer
    buf = open_buffer(directory)
    buf.timestep(4, 0)
    torch.save([random_walk(legacy_layers, 11)], directory / "replay_buffer_0.pt")
    with pytest.raises(trajstore.FormatError, match="the file changed"):
        buf.timestep(0, 0)


def test_a_same_count_rewrite_is_noticed_too(legacy_buffer, legacy_layers):
    """Two other trajectories of the same shapes: the same count, the same size, other numbers."""
    directory, trajs = legacy_buffer
    buf = open_buffer(directory)
    assert bits_equal(buf.timestep(4, 0), trajs[4][0])  # file 2 is the one loaded now
    size = (directory / "replay_buffer_0.pt").stat().st_size
    torch.save([random_walk(legacy_layers, 11, seed=s) for s in (90, 91)], directory / "replay_buffer_0.pt")
    assert (directory / "replay_buffer_0.pt").stat().st_size == size
    with pytest.raises(trajstore.FormatError, match="replay_buffer_0.pt: the file changed"):
        buf.timestep(0, 0)


def test_out_of_range_indices(legacy_buffer):
    buf = open_buffer(legacy_buffer[0])
    with pytest.raises(trajstore.OutOfRangeError, match="5 experts"):
        buf.trajectory(5)
    with pytest.raises(trajstore.OutOfRangeError, match=r"timestep 11 out of range \[0, 10\]"):
        buf.timestep(0, 11)


def test_pre_zip_torch_files_are_read_with_a_warning(tmp_path, legacy_layers):
    traj = random_walk(legacy_layers, 3)
    d = tmp_path / "ConvNet"
    d.mkdir()
    torch.save([traj], d / "replay_buffer_0.pt", _use_new_zipfile_serialization=False)
    with pytest.warns(UserWarning, match="pre-1.6 format") as caught:
        buf = open_buffer(d)
        assert bits_equal(buf.timestep(0, 2), traj[2])
    assert len(caught) == 1  # said once, when opened


# -- the official MCT code's stores ----------------------------------------------------------------

def mct_store(directory, trajs, waypoint_epochs, tag=""):
    """waypoint/step buffer pair as MCT's trajectory_compression.py writes it (betas in float32 0-d tensors)."""
    waypoints, steps = [], []
    for traj in trajs:
        pieces = []
        for a, b in zip(waypoint_epochs, waypoint_epochs[1:]):
            norms = torch.stack([torch.stack([torch.norm(y - x) for x, y in zip(traj[t], traj[t + 1])])
                                 for t in range(a, b)])  # (b - a, L)
            total = torch.where(norms.sum(0) == 0, 1.0, norms.sum(0))  # as MCT guards a layer that never moved
            cum = torch.cat([torch.zeros(1, norms.shape[1]), norms.cumsum(0)]) / total
            pieces.append([[cum[j, l] for l in range(cum.shape[1])] for j in range(b - a + 1)])
        steps.append(pieces if len(waypoint_epochs) > 2 else pieces[0])
        waypoints.append([traj[e] for e in waypoint_epochs])
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(waypoints, directory / f"waypoint_buffer{tag}_0.pt")
    torch.save(steps, directory / f"step_buffer{tag}_0.pt")
    return steps


def written_betas(pieces) -> list[list[float]]:
    """The (K+1) x L betas one trajectory's step entries hold, read straight from what mct_store wrote:
    each piece's points but its last (the next piece's first), then the very last point."""
    pieces = pieces if isinstance(pieces[0][0], list) else [pieces]
    rows = [[float(b) for b in point] for piece in pieces for point in piece[:-1]]
    return rows + [[float(b) for b in pieces[-1][-1]]]


@pytest.mark.parametrize("epochs,tag", [((0, 10), ""), ((0, 3, 6, 10), "_ip4")])
def test_mct_waypoint_stores_materialise_as_mct_does(tmp_path, legacy_layers, epochs, tag):
    trajs = [random_walk(legacy_layers, 11, seed=s) for s in range(2)]
    d = tmp_path / "CIFAR10" / "ConvNet"
    steps = mct_store(d, trajs, epochs, tag)
    buf = open_buffer(d)
    assert (buf.kind, buf.num_experts, buf.num_timesteps, buf.anchor_epochs) == (f"waypoint_buffer{tag}", 2, 11, epochs)
    assert len(buf.files) == 2 and buf.source_of(1)["steps"] == f"step_buffer{tag}_0.pt"
    assert written_betas(steps[0]) != written_betas(steps[1])  # so mixing experts up shows
    for i, traj in enumerate(trajs):
        got = buf.trajectory(i)
        for e in epochs:
            assert bits_equal(got[e], traj[e])  # the stored waypoints themselves
        betas = written_betas(steps[i])  # what this test wrote, not what the reader says
        assert buf.betas(i).tolist() == betas and all(betas[e] == [0.0] * len(legacy_layers) for e in epochs[:-1])
        for t in range(11):
            if t in epochs:
                continue
            j = max(k for k, e in enumerate(epochs) if e < t)
            a, b = epochs[j], epochs[j + 1]
            # MCT's CompressedTrajectoryWithInterpolation.get_waypoint: torch.lerp with the stored 0-d betas
            want = [torch.lerp(x, y, torch.tensor(w, dtype=torch.float32))
                    for x, y, w in zip(traj[a], traj[b], betas[t])]
            assert bits_equal(buf.timestep(i, t), want) and bits_equal(got[t], want), (i, t)
    assert open_buffer(d / f"step_buffer{tag}_0.pt").num_experts == 2


def test_mct_stores_refuse_lonely_files_and_frozen_waypoints(tmp_path, legacy_layers):
    traj = random_walk(legacy_layers, 5)
    d = tmp_path / "ConvNet"
    mct_store(d, [traj], (0, 4))
    (d / "step_buffer_0.pt").rename(d / "step_buffer_1.pt")
    with pytest.raises(trajstore.FormatError, match="no step_buffer partner"):
        open_buffer(d)
    frozen = [[t.clone() for t in traj[0]] for _ in range(5)]
    e = tmp_path / "frozen"
    mct_store(e, [frozen], (0, 4))
    with pytest.raises(trajstore.DegenerateTrajectoryError, match="all 2 waypoints are identical"):
        open_buffer(e).trajectory(0)


# -- exact legacy sizes ----------------------------------------------------------------------------

@pytest.mark.parametrize("num_experts,per_file", [(1, 10), (3, 2), (12, 10)])
def test_mtt_nbytes_matches_torch_save_to_the_byte(tmp_path, legacy_layers, num_experts, per_file):
    trajs = [random_walk(legacy_layers, 4, seed=s) for s in range(num_experts)]
    total = 0
    for n, first in enumerate(range(0, num_experts, per_file)):
        path = tmp_path / f"replay_buffer_{n}.pt"
        torch.save(trajs[first:first + per_file], path)
        total += path.stat().st_size
    assert mtt_nbytes([s for _, s in legacy_layers], 4, num_experts, per_file=per_file) == total


def test_mtt_nbytes_agrees_with_the_mct_authors_measurement():
    """100 CIFAR-10 ConvNet experts of 51 timesteps: 6,547,733,490 bytes as measured by the MCT authors
    (docs/legacy-formats.md §4) with an older torch, whose pickles differ by a few bytes per tensor."""
    cifar = [s for _, s in spec_for("ConvNet").layers()]
    assert mtt_nbytes(cifar, 51, 100) == pytest.approx(6_547_733_490, abs=100 * 51 * len(cifar))  # < 1 byte a tensor
