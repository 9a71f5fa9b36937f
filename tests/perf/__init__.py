"""Performance tooling that needs test-only dependencies (the ``websockets`` peer relay)."""
