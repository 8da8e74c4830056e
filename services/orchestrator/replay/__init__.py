"""Turn records and the replay gate: record turns (opt-in, redacted) as JSON lines, re-run
them against a candidate lane with the recorded tool results fed back, score tool selection."""
