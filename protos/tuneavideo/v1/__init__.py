"""Version 1 of the protocol: `tuneavideo_pb2` (messages) and `tuneavideo_pb2_grpc` (service stubs)."""
