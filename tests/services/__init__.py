"""Fixtures that start real services on loopback for the integration tests.

Each module starts one kind of service and stops it at the end. A missing service binary is a failure in CI
(``CI=true``) and an explicit skip with the install command elsewhere.
"""
