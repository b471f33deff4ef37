"""The interpolation code of trajstore/format/reader.py, by name: the reader job of
tests/mutation_job.py mutates these functions only (docs/mutation-testing.md).

    python tests/mutation_lines.py    # the mutmut names of those functions

mutmut 3 mutates function bodies; a module-level constant among TARGETS (`_PRECISION`) is not mutated by
it and is covered by hand-made mutants instead (docs/mutation-testing.md).
"""

import ast
import sys
from pathlib import Path

PATH = "trajstore/format/reader.py"
# module-level names and classes, Expert and CTraj methods (_piece: the cached y - x of a piece)
TARGETS = {"_PRECISION", "_round_weight", "lerp", "lerp_layers", "_NUMPY_DTYPES", "_FlatLerp", "at", "_piece"}


def mangled_names(source: str | None = None) -> list[str]:
    """mutmut's names of the TARGETS functions: `x_{name}` for a module function, `xǁ{Class}ǁ{name}` for a
    method (mutant names append `__mutmut_{n}`)."""
    tree = ast.parse(source if source is not None else (Path(__file__).resolve().parents[1] / PATH).read_text())
    names = [f"x_{node.name}" for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in TARGETS]
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):  # a class named: all its methods
        names += [f"x\u01c1{cls.name}\u01c1{node.name}" for node in cls.body
                  if isinstance(node, ast.FunctionDef) and (node.name in TARGETS or cls.name in TARGETS)]
    return names


def constants(source: str | None = None) -> list[str]:
    """The module-level assignments among TARGETS (not mutated by mutmut 3)."""
    tree = ast.parse(source if source is not None else (Path(__file__).resolve().parents[1] / PATH).read_text())
    return [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name) and t.id in TARGETS]


if __name__ == "__main__":
    sys.stdout.write("\n".join(mangled_names()) + "\n")
