"""Service and fixtures for a loopback emulator of the Kubernetes Jobs and Pods API, and a local job controller."""

from __future__ import annotations
