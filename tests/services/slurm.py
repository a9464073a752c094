"""Service and fixtures for a single-node Slurm cluster (slurmctld, slurmd, munged)."""

from __future__ import annotations
