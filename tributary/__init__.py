"""The ``tributary`` command: starts tiers, the local cluster, and writes the demo model. No serving logic here."""
