"""The .ctraj format: the layout and its metadata, layer tables, beta schedules, anchors, the reader and the writer (docs/format.md)."""
