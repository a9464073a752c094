"""Reliability and security suite: faults, hostile input and load against the callback transport and the backends.

Each test counts what it submitted, and what was resolved, refused, lost or duplicated.
"""
