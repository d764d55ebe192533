"""Elastic study: arms x seeds trained and evaluated alike, reported with seed spread."""
