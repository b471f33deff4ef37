"""Benchmarks: each script measures one claim and writes a JSON result (see RESULTS.md)."""
