"""Local mode: the data plane of a session pod as local processes (`hogwild serve`, `hogwild demo`)."""
