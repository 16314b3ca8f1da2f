"""The core that the server, the workers and the operator's commands share.

`contract` (the only data that may leave), `settings` (every variable), `message` (the task
message between server and workers), `platform_info` (the server's platform data) and
`brokers` (one module per broker behind one interface). It imports none of the three sides:
`rubrix_hooks` (inside a server), `tasks` (inside a worker), `telemetry_ops` (the operator's).
"""
