"""The profile language (TOML and XML profiles, conditions, facts, snippets), its linter, and the shipped library."""
