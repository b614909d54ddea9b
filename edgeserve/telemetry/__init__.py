"""Telemetry: a local SQLite buffer, Prometheus metrics, OTLP upstream sync, alerts.

The seam the server uses:

- `records.InferenceRecord` (a tuple; build it with `InferenceRecord.ended(...)`, which
  cuts every text field to its bound) and `Recorder.record_ended(record) -> seq` (never
  blocks, never raises; `seq` is durable once `Telemetry.durable_seq >= seq`), or
  `Recorder.record_inference(record)` for a record made any other way (it cuts it first,
  `records.bounded`);
- `service.build_telemetry(settings, state_dir, queue_fill)` -> `Telemetry` with
  `await start()` / `await stop()`, `record_feedback/event/alert/audit`, `forget`,
  `render_metrics()`, `set_update_state`, `note_rollback`, `record_payload` (opt-in,
  sealed), `record_audit` (an upstream copy of audit entries);
- `routes.ROUTES` (/metrics, feedback, events, status, forget) and `cli.telemetry`.

Modules: `store` (queue + writer thread), `maintenance` (size cap, retention,
forget), `metrics`, `sync` + `otlp` (upstream), `alerts`, `audit` (hash chain).
"""
