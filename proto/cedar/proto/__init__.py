"""The contracts layer: what Cedar's parts agree on, with no I/O (.importlinter checks it).

Message models and their JSON Schemas, NATS names and subjects, image references, and the
pure rules more than one part applies. It imports nothing of Cedar's but itself.
"""
