"""Network families as pure descriptions: parameter tables, upstream names, recognition from shapes (no torch modules)."""
