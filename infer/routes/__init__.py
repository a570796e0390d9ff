"""The server's routes, one router per concern: completions, weights, and health/metrics/models."""
