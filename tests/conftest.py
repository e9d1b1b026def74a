"""Test fixtures live in tests/support/, one module per real thing they start."""

import importlib.util

pytest_plugins = [
    name
    for name in (
        "tests.support.upstreams",
        "tests.support.relay",
        "tests.support.gateway",
        "tests.support.postgres",
        "tests.support.kafka",
    )
    # Modules still being written are skipped rather than breaking collection.
    if importlib.util.find_spec(name) is not None
]
