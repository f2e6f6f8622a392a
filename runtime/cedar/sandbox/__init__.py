"""Real local servers (NATS, Docker engine, registry) and a simulated Kubernetes API, for tests and `cedar up --sandbox`."""
