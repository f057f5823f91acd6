"""The emulated network: topology specs, pure shaping and set-link plans, and their appliers.

`spec`, `plan`, `linkchange` and `capabilities` are pure (no pyroute2, no I/O); `kernel`,
`tc`, `nft`, `lifecycle`, `netns`, `container`, `doctor`, `counters` and `state` do the I/O.
Import the appliers from `netem.netns` / `netem.container` so that pure users never load
pyroute2.
"""
