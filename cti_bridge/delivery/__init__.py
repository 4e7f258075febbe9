"""Delivery: the worker that sends CRM requests, the per-user OAuth2 token manager, the retry policy
and the outbound guard."""
