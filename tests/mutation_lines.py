"""Write a patch file that marks the interpolation code of trajstore/format/reader.py as changed, so
`mutmut run --use-patch-file` mutates those lines only (docs/mutation-testing.md).

    python tests/mutation_lines.py > interpolation.patch
"""

import ast
import difflib
import sys
from pathlib import Path

PATH = "trajstore/format/reader.py"
# module-level names and classes, Expert and CTraj methods (_piece: the cached y - x of a piece)
TARGETS = {"_PRECISION", "_round_weight", "lerp", "lerp_layers", "_NUMPY_DTYPES", "_FlatLerp", "at", "_piece"}


def target_lines(source: str) -> set[int]:
    lines = set()
    for node in ast.walk(ast.parse(source)):
        name = getattr(node, "name", None) or (node.targets[0].id if isinstance(node, ast.Assign)
                                               and isinstance(node.targets[0], ast.Name) else None)
        if name in TARGETS:
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def main() -> None:
    source = (Path(__file__).resolve().parents[1] / PATH).read_text()
    keep = target_lines(source)
    new = source.splitlines(keepends=True)
    old = [line for i, line in enumerate(new, 1) if i not in keep]
    sys.stdout.writelines(difflib.unified_diff(old, new, f"a/{PATH}", f"b/{PATH}"))


if __name__ == "__main__":
    main()
