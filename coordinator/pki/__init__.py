"""The federation CA, rosters, revocations and operator identities."""
