"""Local training progress on the operator's terminal."""
