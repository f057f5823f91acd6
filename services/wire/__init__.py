"""Typed messages on the lab's wires: KV frames (frames), scheduler RPCs (rpc)."""
