"""Registers the test-environment fixtures (tests/cluster/plugin.py); they start nothing until used."""

pytest_plugins = ["tests.cluster.plugin"]
