"""The Docker backend: the compose file rendered from a lab config (render), the agent each node
container serves (agent), the container entrypoint (entry), the driver's view of a running
stack (stack) and the host side that brings a stack up and down (backend). The Dockerfile and
the image scripts sit beside it."""
