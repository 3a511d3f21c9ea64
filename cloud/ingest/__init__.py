"""`millrace ingest`: device batches from the broker into TimescaleDB, exactly once.

One module per seam, in the order a message meets them (docs/cloud.md):

- consumer.py  the paho session: shared subscriptions, manual acks fenced by connection
- messages.py  the types that flow between the others: Inbound, Classified items, WriteResult
- classify.py  decode + validate one message into a batch, state, heartbeat or dead letter
- batcher.py   closes a commit batch by rows or time
- store.py     one transaction per commit batch: retry, poison isolation, alert rules
- writer.py    ingest ledger, readings/events COPY, split-window merge, rollups, dead letters
- idcache.py   device and metric ids by name
- streams.py   per (device, boot_id) high-water marks and sequence gaps
- metrics.py   Prometheus metrics, /metrics and /healthz
- worker.py    the two threads, ack after commit, database recovery, `run_worker`
"""
