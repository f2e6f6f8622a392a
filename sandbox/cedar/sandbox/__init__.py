"""Real local servers (NATS, Docker engine, registry) and a simulated Kubernetes API.

Used by the tests and by `cedar up --sandbox`.
"""
