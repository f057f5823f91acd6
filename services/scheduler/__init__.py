"""The central scheduler service: the turn table (`state`), gRPC for engine-group leaders
(`grpc_server`, their `client`), HTTP for clients (`http_server`), and `service`, which runs
them. Policy decisions live in the top-level `scheduler` package, messages in services.wire.rpc.
"""
