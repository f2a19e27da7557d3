"""Shared test helpers: checkpoints built here, real clients, fault proxies, fuzzing."""
