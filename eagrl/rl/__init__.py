"""Rewards, advantages and clipping rules (pure functions)."""
