"""Inputs given by URL: fetched before the job starts, kept in a content-addressed cache."""
