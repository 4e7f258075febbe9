"""The REST admin API: the Xelion CTI server's paths and JSON shapes, plus cti-bridge's extensions."""
