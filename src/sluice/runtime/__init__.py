"""The local executor: threads, bounded queues, accounting, run reports."""
