"""The silo's identity: enrollment and adopting delivered rosters."""
