"""The emulated network: topology specs, pure shaping plans, and the netns applier.

`spec`, `plan` and `capabilities` are pure (no pyroute2, no I/O); `netns`, `doctor`,
`counters` and `state` do the I/O.
Import the applier from `netem.netns` so that pure users never load pyroute2.
"""
