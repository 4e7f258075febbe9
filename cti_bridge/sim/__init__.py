"""Simulators of the systems cti-bridge talks to, for ``cti-bridge demo`` and the tests."""
