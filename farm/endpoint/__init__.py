"""The farm endpoint: one TLS address for every target, safe to expose.

- `server`: the front door (asyncio TLS server): strict reading, policy, bounds, routing,
  module cache, signing with the farm's key; unprivileged, no Docker.
- `broker` / `broker_client`: what needs the Docker engine (the routing table, provisioning,
  retiring idle provisioned servers), in its own container behind a Unix socket.
- `routing`, `policy`, `metrics`, `forward`, `identity`: the front door's parts.
- `service`: the two containers, the farm's identity, the foreground runs.

The request and response formats are farm/wire.py's; the cache is farm/modcache.py.
"""
