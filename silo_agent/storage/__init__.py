"""What the silo keeps on disk: its ledger, its secure-aggregation state, its lock."""
