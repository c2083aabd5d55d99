"""The broker conformance suite: written once, run against every broker."""
