"""The lash-consumer service: RabbitMQ ingress, admission, dispatch and observation.

Everything durable lives in :mod:`lash_core`; this package is the wire contract
(CONTRACT.md) around it: settings, message decoding, topology, admission, the dispatch
loop that drives sessions under leases, the outbox relay, the worker and the CLI.
"""
