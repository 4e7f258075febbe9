"""Persistence: the SQLModel tables, the engine, secret encryption and the queries over them."""
