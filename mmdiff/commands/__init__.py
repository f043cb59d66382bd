"""Thin CLI entry points over the library (argument parsing and printing only)."""
