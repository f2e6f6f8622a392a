"""The puller service: keeps one node's Docker image cache equal to what its workloads need.

The package itself imports nothing; `cedar.puller.app.main` runs the service. The pure
parts (desired, plan, prune, errors) are kept apart from those doing I/O (feed, node,
reconcile, pulls, pruner, prune_state, status, engine, registry, credentials, disk);
docs/puller.md has the design.
"""
