"""The one outbound HTTP client: every request to a provider API goes through `server/http/client.py`."""
