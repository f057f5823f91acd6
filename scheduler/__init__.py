"""Pure DualPath scheduling policies and the GPU cost model.

Frozen views in, frozen plans out; `now` and randomness are arguments. Nothing in this package
does I/O, imports asyncio, sockets or pyroute2.
"""
