"""The API-server side of a request: tokenizing, routing to an engine, turning tokens into text."""
