"""The only silo code that imports grpc: its one outbound stream."""
