"""The HTTP transport: V2 REST routes, the fast inference dispatch, shedding, body limits,
response headers, error mapping, and WebSocket streaming."""
