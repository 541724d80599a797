"""The silofed coordinator: gRPC service, round lifecycle, aggregation, round log, operator CLI."""
