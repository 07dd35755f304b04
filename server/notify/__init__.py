"""Failure notifications: e-mail and Slack on run events, with cooldown and a log in PostgreSQL."""
