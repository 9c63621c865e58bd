"""The API layer: the HTTP client, result URLs, result parsing, retry policy, rate limit."""
