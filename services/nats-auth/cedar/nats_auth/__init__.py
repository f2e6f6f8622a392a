"""The NATS auth callout: a puller connects with its Pod's token and gets one node's rights.

nats-server asks on `$SYS.REQ.USER.AUTH` who a connecting client is; this service checks
the client's bound ServiceAccount token with a Kubernetes TokenReview and answers with a
user JWT whose permissions cover the node named in the token, and nothing of any other
node's. The package itself imports nothing; `cedar.nats_auth.app.main` runs the service.
The pure parts (nkeyjwt, claims, grant, review, errors) are kept apart from the I/O
(responder, app); docs/deploying.md has how to enable it.
"""
