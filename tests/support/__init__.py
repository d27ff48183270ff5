"""Machinery several test tiers share (not tests themselves)."""
