"""Event time: durations, window assignment."""
