"""What a killed build leaves is removed by the next build of the same output, and nothing else is.

Builds happen in hidden siblings of their output (trajstore.stores.atomic.Scratch), each flock()ed by its
process: a SIGKILL, OOM kill or power loss skips every cleanup, and the next build must find such
leftovers (gigabytes for a real pack) without ever touching a build still running.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import run_until_killed

from trajstore.archive import open_archive, pack
from trajstore.stores.atomic import Scratch
from trajstore.tools.convert import convert

# The process dies as the finished archive is moved into place.
KILL_AT_PUBLISH_DIR = """
from trajstore.stores import atomic
atomic.publish_dir = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
"""

# The process dies as the zip of a single-file convert is moved to the convert's scratch name, with the
# writer's build directory and the zip's scratch still there.
KILL_AT_ZIP_PUBLISH = """
from trajstore.stores import atomic
_publish_file = atomic.publish_file
def publish_file(tmp, path, **kwargs):
    if path.name.startswith(".s.ctraj.build-"):
        os.kill(os.getpid(), signal.SIGKILL)
    _publish_file(tmp, path, **kwargs)
atomic.publish_file = publish_file
"""


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_killed_pack_is_cleared_by_the_next_pack(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    out = tmp_path / "arch"
    run_until_killed(KILL_AT_PUBLISH_DIR + f"from trajstore.archive import pack\n"
                     f"pack({str(directory)!r}, {str(out)!r}, progress=False)\nsys.exit(3)\n")
    left = hidden(tmp_path)
    assert len(left) == 2 and left[1] == left[0] + ".lock"  # the killed build and its lock
    assert any((tmp_path / left[0]).rglob("*.json"))  # it got as far as writing the archive
    pack(directory, out, progress=False)
    assert hidden(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["arch", "buffers"]
    assert open_archive(out).num_experts == 5


def test_a_killed_single_file_convert_is_cleared_with_the_scratch_inside_it(tmp_path, legacy_buffer):
    """A single-file convert builds a directory beside its own scratch and zips it beside that: three
    scratches, one inside the other's name; all go."""
    directory, _ = legacy_buffer
    out = tmp_path / "s.ctraj"
    run_until_killed(KILL_AT_ZIP_PUBLISH + f"from trajstore.tools.convert import convert\n"
                     f"convert({str(directory)!r}, {str(out)!r}, single_file=True, progress=False)\nsys.exit(3)\n")
    left = hidden(tmp_path)
    locks = [n for n in left if n.endswith(".lock")]  # the convert's, the writer's build's, the zip's
    assert len(locks) == 3 and re.fullmatch(r"\.s\.ctraj\.build-[0-9a-f]{12}\.lock", locks[2]), left
    convert_scratch = locks[2].removesuffix(".lock")
    assert re.fullmatch(rf"\.{re.escape(convert_scratch)}\.build-[0-9a-f]{{12}}\.lock", locks[0]), left
    assert re.fullmatch(rf"\.{re.escape(convert_scratch)}\.tmp-[0-9a-f]{{12}}\.lock", locks[1]), left
    convert(directory, out, single_file=True, progress=False)
    assert hidden(tmp_path) == [] and out.is_file()


HOLD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from trajstore.stores.atomic import Scratch
    s = Scratch(Path(sys.argv[1]))
    s.path.mkdir()
    print(s.path, flush=True)
    sys.stdin.read()  # alive until the test kills it
""")


def test_only_scratch_of_dead_processes_on_this_host_is_removed(tmp_path):
    target = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        theirs = Path(child.stdout.readline().strip())
        assert theirs.is_dir()
        elsewhere = tmp_path / ".out.build-0123456789ab"  # locked by nobody here, but made on another host
        elsewhere.mkdir()
        (tmp_path / ".out.build-0123456789ab.lock").write_bytes(b"another-host.example")
        dead = tmp_path / ".out.build-abcdefabcdef"  # what a process of this host left when killed
        dead.mkdir()
        (dead / "anchor").write_bytes(b"x" * 100)
        (tmp_path / ".out.build-abcdefabcdef.lock").write_bytes(socket.gethostname().encode())
        unlocked = tmp_path / ".out.build-fedcbafedcba"  # an older trajstore's scratch: no lock, can't tell
        unlocked.mkdir()
        other = tmp_path / ".outer.build-abcdefabcdef"  # another output's
        other.mkdir()
        (tmp_path / ".outer.build-abcdefabcdef.lock").write_bytes(socket.gethostname().encode())

        mine = Scratch(target)
        mine.path.mkdir()
        assert theirs.is_dir() and elsewhere.is_dir() and unlocked.is_dir() and other.is_dir()
        assert not dead.exists() and not (tmp_path / ".out.build-abcdefabcdef.lock").exists()

        child.kill()
        child.wait()
        again = Scratch(target)
        assert not theirs.exists() and not Path(f"{theirs}.lock").exists()
        assert mine.path.is_dir(), "a scratch held by this process was swept"
        assert elsewhere.is_dir() and unlocked.is_dir() and other.is_dir()
        again.release()
        mine.release()
        assert hidden(tmp_path) == sorted([elsewhere.name, elsewhere.name + ".lock", unlocked.name, other.name,
                                           other.name + ".lock"])
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
