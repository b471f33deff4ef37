"""Every benchmark runs end to end at a tiny size and writes its JSON result (no timing is asserted)."""

import json
from pathlib import Path

import pytest

from benchmarks import (bench_convergence, bench_convert, bench_interpolation, bench_matching_memory, bench_remote,
                        bench_sampling, bench_sampling_ablation, bench_storage)


def result(path):
    doc = json.loads(path.read_text())
    assert doc["machine"]["cpu_count"] >= 1 and doc["command"]
    return doc["results"]


def test_interpolation(tmp_path):
    reader = Path(bench_interpolation.__file__).parents[1] / "trajstore" / "format" / "reader.py"
    r = result(bench_interpolation.main(["--width", "8", "--timesteps", "5", "--repeat", "3", "--before", str(reader),
                                         "--out", str(tmp_path / "i.json")]))
    assert r["cpu"]["ratio_at_over_copy"] > 0 and r["cpu"]["bytes"] > 0
    assert r["cpu"]["ratio_before_at_flat_over_copy"] > 0  # another reader.py, timed in the same run
    assert r["cpu"]["bit_identical_to_spec_lerp"] is True  # the timed path computes §7's lerp


def test_sampling(tmp_path):
    r = result(bench_sampling.main(["--experts", "3", "--per-file", "2", "--width", "8", "--timesteps", "6",
                                    "--max-start-epoch", "2", "--repeat", "3", "--out", str(tmp_path / "s.json")]))
    assert r["ctraj_bytes"] < r["file_bytes"]
    assert r["cpu"]["load_all_ram_bytes"] > 0


def test_convert(tmp_path):
    r = result(bench_convert.main(["--experts", "2", "--width", "8", "--timesteps", "30",
                                   "--out", str(tmp_path / "c.json")]))
    assert r["convert"]["seconds"] > 0 and r["torch_load"]["seconds"] > 0


def test_storage(tmp_path):
    r = result(bench_storage.main(["--experts", "1", "--epochs", "2", "--datasets", "cifar10",
                                   "--train-images", "16", "--out", str(tmp_path / "st.json")]))["cifar10"]
    assert r["num_params"] == 320010
    assert r["ctraj_two_anchors_bytes"] < r["ctraj_four_anchors_bytes"] <= r["legacy_bytes"]
    assert r["expert_test_acc"][0] is not None
    assert r["ratio_pack"] < 1


def test_convergence(tmp_path):
    r = result(bench_convergence.main(["--scale", "smoke", "--iterations", "2", "--eval-every", "1",
                                       "--eval-nets", "1", "--seeds", "0", "--png", str(tmp_path / "c.png"),
                                       "--out", str(tmp_path / "cv.json")]))
    assert set(r) == {"mct_seed0", "mtt_seed0", "mct_over_seeds", "mtt_over_seeds"}
    assert [it for it, _, _ in r["mct_seed0"]["curve"]] == [0, 1, 2]
    assert r["mct_seed0"]["expert_epochs"] == r["mtt_seed0"]["expert_epochs"]  # the same M for both methods
    assert r["mct_seed0"]["lr_lr"] == r["mtt_seed0"]["lr_lr"]
    over = r["mct_over_seeds"]["curve"]
    assert [p["iteration"] for p in over] == [0, 1, 2] and over[0]["std"] == 0  # one seed: no spread
    assert over[-1]["mean"] == pytest.approx(r["mct_seed0"]["curve"][-1][1])
    assert (tmp_path / "c.png").stat().st_size > 0


def test_convergence_point_is_where_the_curve_stays_within_two_percent():
    evals = [{"iteration": i, "mean": m} for i, m in [(0, 0.5), (10, 0.80), (20, 0.70), (30, 0.795), (40, 0.81)]]
    assert bench_convergence.converged_at(evals) == 30


def test_sampling_ablation(tmp_path):
    r = result(bench_sampling_ablation.main(["--scale", "smoke", "--experts", "1,2", "--seeds", "0", "--iterations", "1",
                                             "--eval-every", "1", "--eval-nets", "1", "--max-start-epoch", "2",
                                             "--expert-epochs", "1", "--png", str(tmp_path / "a.png"),
                                             "--out", str(tmp_path / "a.json")]))
    assert set(r) == {f"{s}_k{k}" for s in ("continuous", "discrete") for k in (1, 2)}
    for row in r.values():
        assert len(row["best"]) == 1 and row["best_mean"] == row["best"][0] >= row["final"][0]
    assert (tmp_path / "a.png").stat().st_size > 0


def test_matching_memory(tmp_path):
    r = result(bench_matching_memory.main(["--steps", "1,2", "--ipc", "1", "--width", "4", "--im-size", "8",
                                           "--repeat", "1", "--warmup", "0", "--threads", "1",
                                           "--out", str(tmp_path / "m.json")]))
    runs = {(x["memory"], x["syn_steps"]): x for x in r["runs"]}
    assert set(runs) == {(m, n) for m in ("plain", "constant", "tesla") for n in (1, 2)}
    assert runs[("tesla", 2)]["loss"] == pytest.approx(runs[("plain", 2)]["loss"], rel=1e-4)
    for n in (1, 2):  # same numbers in both modes; only memory differs
        assert runs[("plain", n)]["loss"] == pytest.approx(runs[("constant", n)]["loss"], rel=1e-4)


def test_remote(tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    monkeypatch.setenv("TRAJSTORE_CACHE_DIR", str(tmp_path / "cache"))
    r = result(bench_remote.main(["--experts", "2", "--width", "4", "--timesteps", "6", "--waypoints", "2",
                                  "--pairs", "5", "--max-start-epoch", "3", "--measure-mtt",
                                  "--out", str(tmp_path / "r.json")]))
    # MTT's bytes as computed are what torch.load through s3fs transferred
    assert r["open"]["requests"] > 0 and r["mtt_loader"]["measured"]["bytes"] >= r["mtt_loader"]["bytes"]
    # a cold run fetches each anchor once at most: never more than the whole store plus listings
    assert 0 < r["checks_cold"]["anchors_fetched"] <= 2 * 3
    assert r["open_and_pairs_cold"]["bytes"] <= r["store_bytes"] + r["open"]["bytes"]
    # what the request log must show: only the anchors the pairs need, each key once, no listing
    assert r["first_pair"]["reads_only_what_it_needs"] and r["open"]["listings"] == 0
    assert all(r["checks_cold"][k] for k in ("fetched_exactly_the_needed_anchors", "no_key_read_twice",
                                             "small_arrays_once_per_expert_used"))
    assert r["damaged_cache_entry"]["anchors_fetched_again"] == 1


def test_upstream_loop(tmp_path):
    from benchmarks import bench_upstream_loop

    r = result(bench_upstream_loop.main(["--iterations", "2", "--syn-steps", "2", "--width", "8",
                                         "--out", str(tmp_path / "u.json")]))["cpu"]
    assert set(r["seconds_per_iteration"]) == {"upstream_reimplementation", "trajstore_matcher"}
    assert all(len(t) == 2 for t in r["iteration_seconds"].values()) and r["ratio_trajstore_over_upstream"] > 0


def test_evaluate_benchmark(tmp_path):
    from benchmarks import bench_evaluate

    r = result(bench_evaluate.main(["--epochs", "1", "--nets", "2", "--model", "ConvNetW8",
                                    "--out", str(tmp_path / "e.json")]))["cpu"]
    assert set(r["accuracies"]) == {"one_network", "one_network_one_thread", "k_default", "k_one_by_one",
                                    "k_together"}
    assert len(r["accuracies"]["k_together"]) == 2 and r["cpu_ratio_over_one_network"]["k_together"] > 0
    assert r["breakdown"]["step_flops"] > 0 and r["breakdown"]["step_cpu_s"] > 0


def test_step_benchmark(tmp_path):
    from benchmarks import bench_step

    # 20 images of 8 channels x 1024 pixels in the first layer: over train.FAST_STEP_MIN_VALUES
    r = result(bench_step.main(["--ipcs", "2", "--rounds", "4", "--test-rounds", "1", "--model", "ConvNetW8",
                                "--profile", "--out", str(tmp_path / "t.json")]))["ipc2"]
    assert r["step_ms_module"] > 0 and r["step_fast_over_module"] > 0 and r["test_pass_fast_over_module"] > 0
    # the two paths really differ: the module's pooling against the fast step's first convolution on im2col
    assert "aten::avg_pool2d" in r["profile"]["module"]["top_ms"]
    assert "aten::_slow_conv2d_forward" in r["profile"]["fast"]["top_ms"]


def test_evaluate_layouts_benchmark(tmp_path):
    from benchmarks import bench_evaluate

    r = result(bench_evaluate.main(["--layouts", "--nets", "3", "--model", "ConvNetW8",
                                    "--out", str(tmp_path / "l.json")]))["cpu"]
    assert set(r["gflops_per_cpu_s"]) == {"one", "one_channels_last", "wide3", "wide3_channels_last",
                                          "conv_forward", "conv_backward"}
    assert all(len(t) == 3 and min(t) > 0 for t in r["all_cpu_ms"].values())
    assert all(sum(shares.values()) == pytest.approx(1) for shares in r["profile_shares"].values())


def test_the_wide_network_is_the_networks_side_by_side():
    """bench_evaluate's wide network (what --layouts times) computes each network's output and gradient."""
    import torch
    import torch.nn.functional as F

    from benchmarks.bench_evaluate import _Wide
    from trajstore.distill.networks import build

    torch.manual_seed(0)
    nets = [build("ConvNetW8", 3, 10, (32, 32)) for _ in range(3)]
    wide = _Wide(nets)
    xs, ys = torch.randn(3, 4, 3, 32, 32), torch.randint(10, (3, 4))
    out = wide(xs.transpose(0, 1).reshape(4, 9, 32, 32))
    F.cross_entropy(out.flatten(0, 1), ys.t().flatten(), reduction="none").view(4, 3).mean(0).sum().backward()
    for k, net in enumerate(nets):
        alone = net(xs[k])
        F.cross_entropy(alone, ys[k]).backward()
        torch.testing.assert_close(out[:, k], alone, rtol=1e-4, atol=1e-5)
        grads = [p.grad for p in net.parameters()]  # features' in order, then the classifier's
        assert len(grads) == len(wide.weights) + 2
        for w, g in zip(wide.weights, grads):
            torch.testing.assert_close(w.grad.chunk(3)[k], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(wide.fc_w.grad[k], grads[-2], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(wide.fc_b.grad[k], grads[-1], rtol=1e-4, atol=1e-6)


def test_experts_benchmark(tmp_path):
    from benchmarks import bench_experts

    r = result(bench_experts.main(["--ks", "1,2", "--epochs", "1", "--train-images", "40", "--model", "ConvNetW8",
                                   "--out", str(tmp_path / "x.json")]))["cpu"]
    assert set(r["experts_per_hour"]) == {"1", "2"} and all(v > 0 for v in r["experts_per_hour"].values())
