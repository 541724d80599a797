"""The silofed silo agent: dials the coordinator, trains locally, sends masked updates."""
