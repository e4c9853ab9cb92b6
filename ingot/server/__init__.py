"""The OpenAI-compatible HTTP server behind `ingot serve`."""
