"""The OpenAI-compatible HTTP server (`cdserve serve`)."""
