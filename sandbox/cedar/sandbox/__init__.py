"""Real local servers (NATS, Docker engine, registry) and a simulated Kubernetes API.

Used by the tests and by `cedar up --sandbox`; never by the services. The package itself
imports nothing: each module says what it touches. Errors are in `cedar.sandbox.errors`.
"""
