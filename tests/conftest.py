"""Test fixtures live in tests/support/, one module per real thing they start."""

pytest_plugins = [
    "tests.support.upstreams",
    "tests.support.relay",
    "tests.support.gateway",
    "tests.support.postgres",
    "tests.support.kafka",
]
