"""The HTTP daemon: aiohttp app factory, handlers, ingest path and runner."""
