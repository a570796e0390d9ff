"""The inference server: a Paddle decoder behind HTTP, with atomic weight updates (not built yet: issue 4)."""
