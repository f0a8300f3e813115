"""Stripe billing from usage rows (issue: billing job). Not built yet."""
