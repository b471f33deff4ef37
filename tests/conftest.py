import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


# -- legacy buffers, made the way upstream code makes them (trajstore.legacy tests) ----------------

import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device a test runs on: every test that takes it runs on the CPU, and on CUDA when present
    (benchmarks/gpu_check.sh runs those with `-k cuda`)."""
    return request.param


@pytest.fixture
def run():
    """`run(*args, ok=True)`: the trajstore command line in-process; asserts exit 0 unless ok=False."""
    from click.testing import CliRunner

    from trajstore.cli.main import cli

    runner = CliRunner()

    def invoke(*args, ok=True):
        result = runner.invoke(cli, [str(a) for a in args])
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


LEGACY_MODEL = {"channel": 3, "num_classes": 4, "im_size": (32, 32), "width": 4, "depth": 3}


@pytest.fixture
def legacy_layers():
    """(name, shape) of a tiny upstream ConvNet (width 4, depth 3, 4 classes, 32x32 images)."""
    from trajstore.architectures.convnet import ConvNetSpec

    return ConvNetSpec(**LEGACY_MODEL).layers()


def legacy_walk(layers, num_timesteps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """A trajectory like upstream's: K+1 timesteps, each a list of separate float32 tensors. A random
    walk with per-layer drift whose steps draw their noise from a few fixed tensors, so big buffers
    take few random numbers."""
    g = torch.Generator().manual_seed(seed)
    per_layer = []
    for _, shape in layers:
        start, drift = torch.randn((1, *shape), generator=g), 0.05 * torch.randn((1, *shape), generator=g)
        noise = 0.02 * torch.randn((5, *shape), generator=g)
        steps = drift + noise[torch.randint(0, 5, (num_timesteps - 1,), generator=g)]
        per_layer.append(torch.cat([start, start + steps.cumsum(0)]))
    return [[p[t].clone() for p in per_layer] for t in range(num_timesteps)]


@pytest.fixture
def legacy_write(legacy_layers):
    """write(directory, num_experts, num_timesteps=11, per_file=10, seed=0, layers=None) -> trajectories,
    saved as upstream does: `torch.save` of a list of trajectories into each replay_buffer_{n}.pt."""

    def write(directory, num_experts, num_timesteps=11, per_file=10, seed=0, layers=None):
        directory.mkdir(parents=True, exist_ok=True)
        trajs = [legacy_walk(layers or legacy_layers, num_timesteps, seed=seed + i) for i in range(num_experts)]
        for n, first in enumerate(range(0, num_experts, per_file)):
            torch.save(trajs[first:first + per_file], directory / f"replay_buffer_{n}.pt")
        return trajs

    return write


@pytest.fixture
def legacy_buffer(tmp_path, legacy_write):
    """(model directory buffers/CIFAR10_NO_ZCA/ConvNet, its trajectories): 5 experts x 11 timesteps, 2 per file."""
    directory = tmp_path / "buffers" / "CIFAR10_NO_ZCA" / "ConvNet"
    return directory, legacy_write(directory, 5, per_file=2)


# -- a real S3 API on 127.0.0.1 (moto's server), for the remote-store tests --------------------------


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free 127.0.0.1 port, once per session, with a bucket for the tests."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:  # dummy credentials, inherited by subprocess writers
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="trajstore-tests")
        yield endpoint
        server.stop()
