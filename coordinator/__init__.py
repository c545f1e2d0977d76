"""The reference coordinator: accepts agents, verifies what they attest, stores it, shows it."""
