"""cti-bridge: a Xelion CTI-to-CRM bridge.

Call events from Xelion's notification websocket become durable deliveries of CRM requests, sent
with the OAuth2 token of the Xelion user each call belongs to. See README.md and ../shared/DESIGN.md.
"""

__version__ = "0.1.0"
