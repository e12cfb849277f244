"""The application behind the `aim` command: train, eval, explain, report, demo, data, bench, profile."""
