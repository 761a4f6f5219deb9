"""The bench suite's own checks: `python -m bench` lists and runs every part, and each part's pure pieces
(windows, clocks, skew) compute what they say. Never its figures: speed is measured in bench/ and recorded in
bench/RESULTS.md, not asserted. Nothing here is shared between its modules yet."""
