"""silofed: the neutral package both roles (and task authors) import.

Rule: what the coordinator and the silo agent both need and is not protocol lives here, once.
Nothing here imports `coordinator`, `silo_agent`, grpc or `protos`; it may use secagg's pure pieces.
"""
