"""Alerts, in three parts with different callers (docs/alerts.md).

- engine.py: evaluation inside ingest (the worker), raising and clearing.
- lifecycle.py: acknowledgement, the one write the dashboard makes.
- rules.py: rule types, the rules file, and storing rules (operator tooling).

Import from the part you need; nothing is re-exported here, so the dashboard
importing lifecycle does not load the engine.
"""
