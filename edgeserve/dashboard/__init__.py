"""The dashboard: one server-rendered page for people, plain SVG charts, no scripts."""
