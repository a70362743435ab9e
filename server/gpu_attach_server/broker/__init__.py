"""The broker: GPU pool, leases, scheduling, auth and the HTTP API."""
