"""Operator side of rubrix-telemetry: the `rubrix-telemetry` command and what it runs.

The three sides of the project, one package each: `rubrix_hooks/` runs inside the server,
`tasks/` in the Celery workers, and `telemetry_ops/` on an operator's shell (`cli`,
`status`, `preview`, the audit `collector` and the `demo`). The contract and the settings
live in `rubrix_hooks` and are imported by all three.
"""
