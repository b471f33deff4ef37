"""Whole-store tools over the format: convert, export, inspect/verify, and what they report."""
