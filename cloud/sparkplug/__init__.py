"""`millrace sparkplug`: the cloud as a Sparkplug B primary host application.

One module per job, in the order a message meets them (docs/sparkplug.md):

- topic.py     spBv1.0 topics, the host's STATE topic, subscriptions
- schema.py    the spec's protobuf schema for Google's runtime
- values.py    datatypes: which field carries a value, what millrace keeps
- names.py     Sparkplug ids and metric names to millrace device ids and metric names
- claims.py    which Sparkplug source owns each millrace device id (no two merged)
- sessions.py  per edge node: bdSeq, seq, aliases; each message accepted, dropped or refused
- windows.py   numeric readings into aligned windows, closed after a grace period
- host.py      the MQTT session (STATE birth and will, rebirth NCMD) and the store loop
- config.py    the TOML file; cli.py the subcommand
"""
