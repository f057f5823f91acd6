"""The emulated machines: storage servers, engine nodes, the scheduler service, the wire.

All network I/O of the lab lives here. Policies come from `scheduler/`; nothing here builds
namespaces or qdiscs (that is `netem/`).
"""
