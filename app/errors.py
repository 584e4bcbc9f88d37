"""Errors of the command line itself."""

from __future__ import annotations


class UsageError(Exception):
    """Bad command-line usage: exit code 2."""
