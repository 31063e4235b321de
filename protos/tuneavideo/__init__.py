"""Generated gRPC stubs of the Tune-A-Video serving protocol (see protos/README.md)."""
