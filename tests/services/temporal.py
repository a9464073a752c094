"""Service and fixtures for a Temporal dev server."""

from __future__ import annotations
