"""Service and fixtures for a moto server standing in for AWS Batch, and a local job runner."""

from __future__ import annotations
