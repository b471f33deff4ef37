"""Set up (and run) one mutation-testing job of the core in a scratch copy (docs/mutation-testing.md).

    python tests/mutation_job.py beta /tmp/mut/beta          # prepare the copy, print the commands
    python tests/mutation_job.py beta /tmp/mut/beta --run    # ... and run mutmut there (niced)
    python tests/mutation_job.py beta /tmp/mut/check --tests tests/test_beta.py --run NAME ...
                                     # a fresh copy: the named mutants (patterns) against these tests only

mutmut 3 (not a test dependency: `pip install "mutmut==3.8.1"` into a throwaway venv) imports the code and
runs the test collection once, then forks a process per mutant that runs only the tests that reached the
mutated function, so torch is imported once per job, not once per mutant. The copy is the working tree's
files with `distill/` and `cli/` moved to the package folders pyproject.toml maps them to, so mutmut's
`mutants/` folder holds an importable `trajstore` and nothing of the working tree is ever mutated.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# job -> (the module mutated, the tests whose coverage decides which run per mutant)
JOBS = {
    "beta": ("trajstore/format/beta.py",
             ["tests/test_beta.py", "tests/test_mct_faithful.py", "tests/test_format.py", "tests/test_conformance.py",
              "tests/test_properties.py"]),
    "mct": ("trajstore/legacy/mct.py", ["tests/test_mct_store.py", "tests/test_legacy.py", "tests/test_convert.py"]),
    # the interpolation only: mutants of the functions named in mutation_lines.TARGETS
    "reader": ("trajstore/format/reader.py",
               ["tests/test_interpolation_rounding.py", "tests/test_conformance.py", "tests/test_format.py",
                "tests/test_properties.py"]),
}


def scratch_copy(dest: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files, `distill/` and `cli/` moved to where
    pyproject.toml maps them (trajstore.distill, trajstore.cli), so `dest` on sys.path imports this copy."""
    if dest.exists():
        shutil.rmtree(dest)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():  # not deleted in the working tree
            target = dest / package_path(f)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, target)


def package_path(path: str) -> str:
    return re.sub(r"^(distill|cli)/", r"trajstore/\1/", path)


def mutant_patterns(job: str) -> list[str]:
    """mutmut mutant-name patterns of the job's functions (all of the module unless it has TARGETS)."""
    if job != "reader":
        return []
    import mutation_lines

    module = JOBS[job][0].removesuffix(".py").replace("/", ".")
    return [f"{module}.{name}__mutmut_*" for name in mutation_lines.mangled_names()]


def prepare(job: str, dest: Path, tests: list[str] | None = None, names: list[str] | None = None) -> list[str]:
    module, default_tests = JOBS[job]
    tests = tests or default_tests
    scratch_copy(dest)
    config = (f'\n[tool.mutmut]\nsource_paths = ["trajstore"]\nonly_mutate = ["{module}"]\n'
              f"pytest_add_cli_args_test_selection = {tests!r}\n".replace("'", '"')
              + 'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
              + 'process_isolation = "forkserver"  # torch is not fork-safe once it has run\n'
              + "use_git_change_detection = false\n")
    with open(dest / "pyproject.toml", "a") as f:
        f.write(config)
    return ["mutmut", "run", "--max-children", "2", *(names or mutant_patterns(job))]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in JOBS:
        print(__doc__, file=sys.stderr)
        return 2
    job, dest, rest = argv[0], Path(argv[1]).resolve(), argv[2:]
    tests = rest[rest.index("--tests") + 1].split(",") if "--tests" in rest else None
    names = [a for i, a in enumerate(rest) if not a.startswith("--") and (i == 0 or rest[i - 1] != "--tests")]
    command = prepare(job, dest, tests, names)
    print(f"cd {dest} && nice -n 15 {shlex.join(command)}\n"
          f"cd {dest} && mutmut results; mutmut show <name>   # the survivors and their diffs")
    if "--run" in argv:
        mutmut = Path(sys.executable).with_name("mutmut")
        return subprocess.call(["nice", "-n", "15", str(mutmut) if mutmut.exists() else "mutmut", *command[1:]],
                               cwd=dest, env={**os.environ, "PYTHONPATH": ""})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
