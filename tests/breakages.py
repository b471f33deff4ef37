"""Break the code on purpose, one promise at a time, and check that the test named for it fails
(issue 16; docs/mutation-testing.md "Breakages").

    python tests/breakages.py              # every breakage; prints a markdown table
    python tests/breakages.py quickstart   # the breakages whose name contains "quickstart"

Each breakage replaces one exact snippet of the source (it must occur exactly once, so a refactor that
moves the code makes this script say so instead of testing nothing) in a scratch copy of the working
tree, runs the named tests there, and reports which of them failed. The working tree is never edited.
A breakage "holds" when every named test fails on it; the script exits 1 otherwise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutation_job import package_path, scratch_copy  # noqa: E402


@dataclass(frozen=True)
class Breakage:
    name: str
    broken: str  # what the breakage does
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


BREAKAGES = [
    Breakage("mct-first-betas", "MCT import: every expert reads the first expert's betas",
             "trajstore/legacy/mct.py", "pieces = _pieces(self._loaded[2][j],", "pieces = _pieces(self._loaded[2][0],",
             ("tests/test_legacy.py::test_mct_waypoint_stores_materialise_as_mct_does",
              "tests/test_convert.py::test_mct_waypoint_store_keeps_its_waypoints")),
    Breakage("constant-memory-first-order", "constant memory: the second-order (Hessian) term dropped from the reverse pass",
             "distill/matching.py", "adjoint = adjoint - lr * vjp[1]", "adjoint = adjoint",
             ("tests/test_matching.py::test_constant_memory_drops_second_order_terms_nowhere",)),
    Breakage("convert-threads", "conversion: the single-thread decorator deleted",
             "trajstore/tools/convert.py", "@single_threaded()\n@os_errors", "@os_errors",
             ("tests/test_convert.py::test_conversion_runs_single_threaded_and_restores_the_thread_count",)),
    Breakage("functional-net-writes-module", "FunctionalNet writes the flat vector into the module before the call",
             "distill/networks/__init__.py", "return functional_call(self.net, self.unflatten(flat), (x,))",
             "torch.nn.utils.vector_to_parameters(flat.detach(), self.net.parameters())\n"
             "        return functional_call(self.net, self.unflatten(flat), (x,))",
             ("tests/test_networks.py::test_functional_network_equals_module_network",)),
    Breakage("writer-refuses-buffers", "writer: a state_dict with BatchNorm buffers refused again",
             "trajstore/format/layers.py", "        if missing:\n",
             "        if missing or set(params) - {layer.name for layer in layers}:\n",
             ("tests/test_writer.py::test_writer_accepts_modules_and_state_dicts",)),
    Breakage("legacy-same-count-rewrite", "legacy buffer: the changed-file check dropped (a same-count rewrite)",
             "trajstore/legacy/buffer.py", "self._unchanged(self.files[f])", "pass",
             ("tests/test_legacy.py::test_a_same_count_rewrite_is_noticed_too",)),
    Breakage("mct-same-count-rewrite", "MCT pair: the changed-file check dropped (a same-count rewrite)",
             "trajstore/legacy/mct.py", "self._unchanged(path)", "pass",
             ("tests/test_mct_store.py::test_a_rewritten_pair_is_noticed",)),
    Breakage("beta-off-by-one", "beta_from_norms: each piece's betas shifted by one step",
             "trajstore/format/beta.py", "beta[a + 1 : b] = frac[:-1]", "beta[a + 1 : b] = frac[1:]",
             ("tests/test_beta.py::test_beta_by_hand",
              "tests/test_convert.py::test_anchors_are_the_source_timesteps_and_betas_follow_eq9")),
    Breakage("beta-whole-trajectory", "beta_from_norms: pieces normalised by the whole trajectory's length",
             "trajstore/format/beta.py", "total = cum[-1]", "total = norms.sum(axis=0)",
             ("tests/test_beta.py::test_beta_by_hand", "tests/test_properties.py::test_round_trip_and_interpolation")),
    Breakage("weights-piece-end", "piece_weights: beta[hi] instead of 1 at a piece's end",
             "trajstore/format/beta.py", "b_hi = [1.0] * len(b_lo) if hi == end else beta[hi]", "b_hi = beta[hi]",
             ("tests/test_beta.py::test_piece_weights_by_hand", "tests/test_properties.py::test_round_trip_and_interpolation",
              "tests/test_conformance.py::test_trajstore_gives_the_expected_values_bit_for_bit")),
    Breakage("quickstart-verdict-inverted", "quickstart verdict: the comparison inverted",
             "distill/quickstart.py", "if margin > 0 else", "if margin < 0 else",
             ("tests/test_quickstart.py::test_quickstart_smoke_writes_its_table_and_files",)),
    Breakage("quickstart-verdict-always-beats", "quickstart verdict: always \"beats\"",
             "distill/quickstart.py", "if margin > 0 else", "if True else",
             ("tests/test_quickstart.py::test_quickstart_smoke_writes_its_table_and_files",)),
    Breakage("mtt-nbytes-2-bytes-a-tensor", "mtt_nbytes: 2 bytes too many per tensor (within the old 1e-3)",
             "trajstore/legacy/sizes.py", "total += zip_size(f\"replay_buffer_{n}\", records[count])",
             "total += zip_size(f\"replay_buffer_{n}\", records[count]) + 2 * count * num_timesteps * len(shapes)",
             ("tests/test_legacy.py::test_mtt_nbytes_agrees_with_the_mct_authors_measurement",)),
    Breakage("legacy-reload-every-sample", "legacy buffer: the loaded file not kept (reloaded every sample)",
             "trajstore/legacy/buffer.py", "if self._loaded is None or self._loaded[0] != f:\n            self._loaded = None  # drop",
             "if True:\n            self._loaded = None  # drop",
             ("tests/test_sources.py::test_legacy_source_on_a_real_buffer_loads_one_file_per_sample",)),
    Breakage("metrics-not-flushed-at-checkpoint", "distill: metrics.jsonl not flushed at a checkpoint (lost in a real SIGKILL)",
             "distill/run.py", "        metrics.flush()\n        _save_checkpoint(", "        _save_checkpoint(",
             ("tests/test_run.py::test_a_killed_run_resumes_to_the_same_result",)),
    Breakage("metrics-not-truncated-on-resume", "distill: metrics.jsonl not truncated to the checkpoint on resume",
             "distill/run.py", "f.truncate(int(state[\"metrics_bytes\"]))", "pass",
             ("tests/test_run.py::test_a_killed_run_resumes_to_the_same_result",)),
    Breakage("experts-restart-from-scratch", "train_experts: a resumed run trains every expert again",
             "distill/experts.py", "todo = [i for i in range(num_experts) if i not in set(finished)]",
             "todo = list(range(num_experts))",
             ("tests/test_experts.py::test_resume_after_an_interruption_gives_the_uninterrupted_result",)),
    Breakage("fast-step-spread-scale", "fast training step: pooling's backward spreads each gradient at 1/2, not 1/4",
             "distill/networks/student_ops.py", "cols = (g * 0.25).unsqueeze(-1)", "cols = (g * 0.5).unsqueeze(-1)",
             ("tests/test_train_step.py::test_fast_forward_and_gradients_equal_the_modules_autograd",
              "tests/test_train_step.py::test_training_epochs_equal_a_plain_module_loop")),
    Breakage("fast-step-no-bias-gradient", "fast training step: the convolutions' bias gradients never computed",
             "distill/networks/student_ops.py", "else _conv_param_grads(x, gy, weight, ctx.padding, want_weight, want_bias))",
             "else _conv_param_grads(x, gy, weight, ctx.padding, want_weight, False))",
             ("tests/test_train_step.py::test_fast_forward_and_gradients_equal_the_modules_autograd",)),
    Breakage("fast-step-no-relu-mask", "fast training step: the ReLU's mask left out of the norm's first-order backward",
             "distill/networks/student_ops.py", "_group_norm_backward(_norm_output_grad(g_res, out, ctx.pool),",
             "_group_norm_backward(_norm_output_grad(g_res, None, ctx.pool),",
             ("tests/test_train_step.py::test_fast_forward_and_gradients_equal_the_modules_autograd",)),
    Breakage("fast-step-first-conv-flipped", "fast training step: the im2col first convolution with a mirrored kernel",
             "distill/networks/student_ops.py", "_slow_conv2d_forward(x, weight, weight.shape[2:], bias,",
             "_slow_conv2d_forward(x, weight.flip(-1), weight.shape[2:], bias,",
             ("tests/test_train_step.py::test_fast_forward_and_gradients_equal_the_modules_autograd",)),
    Breakage("fast-step-threshold-inverted", "forward_of: small batches take the Functions and large ones the module",
             "distill/train.py", "x.shape[-1] < min_values:", "x.shape[-1] >= min_values:",
             ("tests/test_train_step.py::test_small_batches_run_as_the_module_and_large_ones_fast",)),
    Breakage("fast-step-parameters-detached", "forward_of: the network's parameters detached (no gradient reaches them)",
             "distill/train.py", "return ops(dict(net.named_parameters()), x)",
             "return ops({n: p.detach() for n, p in net.named_parameters()}, x)",
             ("tests/test_train_step.py::test_training_epochs_equal_a_plain_module_loop",)),
]


def apply(copy: Path, b: Breakage) -> None:
    path = copy / package_path(b.path)
    text = path.read_text()
    if text.count(b.old) != 1:
        raise SystemExit(f"{b.name}: {b.path} holds the snippet {text.count(b.old)} times (expected once); "
                         "update tests/breakages.py to the code as it is now")
    path.write_text(text.replace(b.old, b.new))


def failing_tests(copy: Path, tests: tuple[str, ...]) -> tuple[list[str], str]:
    env = {**os.environ, "PYTHONPATH": str(copy)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--timeout=600",
                           *tests], cwd=copy, env=env, capture_output=True, text=True)
    failed = sorted({m.group(1) for m in re.finditer(r"^FAILED (\S+)", proc.stdout, re.M)})
    return failed, proc.stdout[-3000:]


def main(argv: list[str]) -> int:
    chosen = [b for b in BREAKAGES if not argv or any(a in b.name for a in argv)]
    rows, holds = [], True
    for b in chosen:
        with tempfile.TemporaryDirectory(prefix=f"breakage-{b.name}-") as tmp:
            copy = Path(tmp) / "copy"
            scratch_copy(copy)
            apply(copy, b)
            failed, tail = failing_tests(copy, b.tests)
        # a parametrised test fails under its own id (test[case]); count it as the named test failing
        missed = [t for t in b.tests if not any(f == t or f.startswith(t + "[") for f in failed)]
        holds &= not missed
        print(f"{b.name}: {'holds' if not missed else 'MISSED by ' + ', '.join(missed)}", file=sys.stderr)
        if missed:
            print(tail, file=sys.stderr)
        rows.append(f"| {b.broken} | `{b.path}` | " + ", ".join(
            f"`{t.split('::')[-1]}`" + (" (passed!)" if t in missed else "") for t in b.tests) + " |")
    print("| breakage | in | tests that fail on it |\n|---|---|---|")
    print("\n".join(rows))
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
